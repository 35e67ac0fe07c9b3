"""Train the demo student with Hugging Face Trainer from the demo run's logit cache.

Needs `pipe run configs/demo.toml` (or its stages up to cache-logits) and accelerate
(`pip install "logitcache[hf]"`). Any AutoModelForCausalLM of the data's vocabulary works.
"""

import argparse
from pathlib import Path

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from logitcache import DistillationTrainer, open_dataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory (RUN/data, RUN/cache)")
parser.add_argument("--out", type=Path, default=None, help="default: RUN/students/hf_trainer")
parser.add_argument("--max-steps", type=int, default=-1, help="default: 8 epochs")
parser.add_argument("--log-steps", type=int, default=10)
parser.add_argument("--alpha", type=float, default=0.5, help="(1 - alpha) * CE + alpha * T^2 * KL")
args = parser.parse_args()

dataset = open_dataset(args.run / "cache")  # windows of RUN/data with their cached teacher top-k
tokenizer = AutoTokenizer.from_pretrained(args.run / "data")
tokenizer.model_max_length = seq_len = dataset[0]["input_ids"].shape[0]
student = LlamaForCausalLM(LlamaConfig(  # the demo student ([student.model] of configs/demo.toml)
    vocab_size=len(tokenizer), hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=256, max_position_embeddings=seq_len, bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))  # fmt: skip
training = TrainingArguments(
    output_dir=str(args.out or args.run / "students" / "hf_trainer"), per_device_train_batch_size=32,
    num_train_epochs=8, max_steps=args.max_steps, learning_rate=2e-3, weight_decay=0.1, warmup_steps=20,
    lr_scheduler_type="cosine", logging_steps=args.log_steps, save_steps=100, report_to="none", seed=1234)  # fmt: skip
trainer = DistillationTrainer(model=student, args=training, train_dataset=dataset, alpha=args.alpha)
trainer.train()
trainer.save_model()  # an ordinary HF folder: AutoModelForCausalLM.from_pretrained(out)
trainer.save_state()  # out/trainer_state.json: the logged losses
tokenizer.save_pretrained(training.output_dir)
