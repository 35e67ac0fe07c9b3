"""Integrations of logitcache with other training frameworks (Hugging Face Trainer)."""
