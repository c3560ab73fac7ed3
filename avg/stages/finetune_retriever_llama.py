"""Train the decoder-only generative retriever (LLaMA family or any HF causal LM) with LoRA.

Eq. 7 on a prompt: ``<template(caption)> <v..> <v..> ... EOS``, loss on the vokens and EOS only.
The vokens are new tokens initialised from the RQ-VAE codebook; LoRA adapts the attention (or
``--lora-target-modules``) while the voken rows of the embedding / output head train in full
(avg.retriever.llama). ``--full-finetune`` trains every weight instead (small models).

    python -m avg.stages.finetune_retriever_llama --data-dir outputs/demo/prepare_retriever_dataset \\
        --codes-dir outputs/demo/generate_codes --model data/smollm2-135m --out-dir outputs/demo/finetune_retriever_llama
    accelerate launch -m avg.stages.finetune_retriever_llama ... --model meta-llama/Llama-2-7b-hf --gradient-checkpointing
    # DeepSpeed: accelerate launch --use_deepspeed --deepspeed_config_file ds.json -m avg.stages.finetune_retriever_llama ...
    # (the DeepSpeed json must set train_micro_batch_size_per_gpu; batches are not an accelerate DataLoader)

Outputs under --out-dir: ``best/`` (adapter or full model + tokenizer + voken_vocab.json +
llama_retriever.json + best.json, chosen by val R@1), ``checkpoints/last`` (accelerate state with
only the trainable weights under LoRA, for --resume), ``eval/run_<split>_epoch<e>.jsonl``,
``eval/metrics_test.json`` + ``eval/run_test.jsonl`` (best model reloaded from disk, on test),
``train.log``, ``metrics.jsonl``, ``stage.json``.

Interruptions: re-running the same command after a kill resumes from ``checkpoints/last``
(``--save-every-steps`` for mid-epoch checkpoints) when ``stage.json`` says a run of this
configuration was interrupted; ``--resume`` asks for it explicitly. A different configuration in
--out-dir is refused unless ``--force``; a forced or repeated finished run starts fresh and deletes
the old ``best/``, ``checkpoints/`` and ``eval/`` first.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from accelerate import DistributedType

from avg.artifacts.registry import manifest_name
from avg.artifacts.runfiles import write_run
from avg.retriever import llama as L
from avg.retriever.data import read_codes
from avg.retriever.evaluate import evaluate_split
from avg.search.gallery import Gallery
from avg.retriever.training import add_eval_and_checkpoint_args, check_data_matches_vocab, load_split
from avg.train.batches import EpochBatchSampler
from avg.train.loop import (check_checkpoint, checkpoint_dir, configure_deepspeed, describe_batch,
                            linear_warmup_schedule, log_resumed, log_stopped, make_accelerator, per_process_batch,
                            resolve_mixed_precision, resume_from, select_best, start_training_run, train_epochs,
                            trainable_only_hooks)
from avg.retriever.vocab import VokenVocab
from avg.core.io import InputError, read_json, write_json
from avg.core.seed import set_seed
from avg.core.stages import add_force_arg
from avg.core.cli import add_device_arg, run_main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data-dir", required=True, help="prepare_retriever_dataset/ folder from avg.stages.prepare_retriever_dataset")
    g.add_argument("--codes-dir", required=True, help="generate_codes/ folder (voken metadata and codebook.npy)")
    g.add_argument("--model", required=True, help="HF hub name or local path of a causal LM (e.g. data/smollm2-135m)")
    g.add_argument("--out-dir", required=True, help="output folder")
    g.add_argument("--prompt-template", default=L.DEFAULT_PROMPT_TEMPLATE, help="model input around the caption; must contain {query} (a real newline: $'...\\n...' in bash)")
    g.add_argument("--max-length", type=int, default=96, help="max prompt tokens (truncated from the left)")
    g.add_argument("--no-voken-embedding", action="store_true", help="ablation: random voken embeddings instead of the codebook")
    g.add_argument("--max-train-queries", type=int, default=0, help="use a seeded random subset of N training queries (0: all)")
    g.add_argument("--max-eval-queries", type=int, default=0, help="evaluate val and test on seeded random subsets of N queries (0: all)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--full-finetune", action="store_true", help="train every weight, no LoRA (small models)")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling alpha (update scale alpha / r)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    g.add_argument("--lora-target-modules", default=L.DEFAULT_LORA_TARGETS,
                   help="comma-separated module names to adapt, or 'all-linear'")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=3, help="training epochs (0: evaluate only)")
    g.add_argument("--batch-size", type=int, default=16, help="queries per micro-batch over all processes (the global batch; each of W processes takes 1/W)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--voken-lr", type=float, default=None,
                   help="peak learning rate of the new voken rows under LoRA (default: --lr); new tokens start "
                        "far from the model's distribution and learn faster with a larger one")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on biases/norms)")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warmup")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                   help="autocast precision (auto: bf16 on a bf16-capable GPU, else no)")
    g.add_argument("--model-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the loaded weights (auto: bf16 base under LoRA on a bf16 GPU, else float32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--seed", type=int, default=42, help="seed for init, data order and dropout")
    add_device_arg(g)
    add_eval_and_checkpoint_args(p, eval_batch_size=16, eval_train_queries=0, log_every=10,
                                 fast_search_help="test: score over voken logits only (renormalised, see avg.search.beam); "
                                                  "the in-training evaluation of a LoRA model always uses the full vocabulary")
    add_force_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    L.check_template(args.prompt_template)
    lora = not args.full_finetune
    mp = resolve_mixed_precision(args.mixed_precision, cpu=args.device == "cpu")
    # inputs are checked before anything under --out-dir is touched
    codes = read_codes(args.codes_dir, with_codebook=not args.no_voken_embedding)
    vocab = VokenVocab.from_meta(codes.meta, source=str(Path(args.codes_dir) / "codes.json"))
    check_data_matches_vocab(args.data_dir, vocab, Path(args.codes_dir) / "codes.json")
    if not args.no_voken_embedding and codes.codebook is None:
        raise InputError(f"{args.codes_dir}: codebook.npy not found (or pass --no-voken-embedding)")
    data_dir = Path(args.data_dir)
    train_q, train_gallery = load_split(data_dir, "train", vocab.code_len, args.collision_seed)
    val_q, val_gallery = load_split(data_dir, "val", vocab.code_len, args.collision_seed)
    test_q, test_gallery = load_split(data_dir, "test", vocab.code_len, args.collision_seed)
    if args.epochs > 0 and not train_q:
        raise InputError(f"{data_dir / 'train.jsonl'}: no training queries")
    accelerator = make_accelerator(args.device, grad_accum=args.grad_accum, mixed_precision=mp)
    set_seed(args.seed)
    out_dir = Path(args.out_dir)
    ckpt_dir = checkpoint_dir(out_dir)
    started = start_training_run(accelerator, args, out_dir, manifest_name("finetune_retriever_llama"),
                                 inputs=[args.data_dir, args.codes_dir, args.model],
                                 run_name=args.run_name or "llama-retriever", logger_name="avg.train_llama")
    if started.skipped is not None:
        return started.skipped
    run, logger, resuming = started.stage, started.logger, started.resuming
    device = accelerator.device

    # ---- model: base LM + vokens (+ LoRA)
    dtype = L.resolve_dtype(args.model_dtype, lora=lora, device=device)
    tokenizer, model = L.load_causal_lm(args.model, dtype=dtype)
    L.add_vokens(tokenizer, model, vocab, codes.codebook, random_init=args.no_voken_embedding, seed=args.seed)
    if args.gradient_checkpointing:
        L.enable_checkpointing(model)
    model.config.use_cache = False
    if lora:
        model = L.add_lora(model, vocab, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                           target_modules=args.lora_target_modules)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("%s + %d vokens (init=%s), %s: %d / %d trainable weights (%.3f%%), dtype %s, mixed precision %s",
                args.model, len(vocab.tokens()), "random" if args.no_voken_embedding else "codebook",
                "LoRA" if lora else "full fine-tuning", n_train, n_all, 100 * n_train / n_all, dtype, mp)

    # ---- data
    meta_path = data_dir / "meta.json"
    if meta_path.is_file() and read_json(meta_path).get("transductive"):
        logger.warning("!!! TRANSDUCTIVE training data (%s): pseudo queries on val/test gallery images !!!", meta_path)
    n_test_total = len(test_q)
    train_q = L.query_subset(train_q, args.max_train_queries, args.seed, 1)
    val_q = L.query_subset(val_q, args.max_eval_queries, args.seed, 2)
    test_q = L.query_subset(test_q, args.max_eval_queries, args.seed, 3)
    eval_train_q = L.query_subset(train_q, args.eval_train_queries, args.seed, 7) if args.eval_train_queries > 0 else []

    train_ds = L.prompt_dataset(train_q, tokenizer, vocab, args.prompt_template, max_length=args.max_length) if train_q else None
    collate = L.CausalCollator(train_ds, tokenizer.pad_token_id) if train_ds else None
    sampler = EpochBatchSampler(len(train_q), per_process_batch(args.batch_size, accelerator.num_processes),
                                seed=args.seed,
                                rank=accelerator.process_index, world_size=accelerator.num_processes)
    micro_per_epoch = sampler.batches_per_epoch() if train_q else 0
    steps_per_epoch = math.ceil(micro_per_epoch / args.grad_accum) if micro_per_epoch else 0
    total_steps = max(1, steps_per_epoch * args.epochs)

    decay, no_decay, rows = [], [], []
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        if "trainable_tokens_delta" in name:
            rows.append(prm)
        else:
            (no_decay if prm.ndim < 2 or "norm" in name.lower() else decay).append(prm)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": rows, "weight_decay": 0.0, "lr": args.voken_lr or args.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr)
    scheduler = linear_warmup_schedule(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    configure_deepspeed(accelerator, micro_batch=sampler.batch_size, grad_accum=args.grad_accum,
                        max_grad_norm=args.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    # LoRA checkpoints hold only the trainable weights (DeepSpeed writes its own checkpoint format)
    partial_ckpt = lora and accelerator.distributed_type != DistributedType.DEEPSPEED
    if partial_ckpt:
        trainable_only_hooks(accelerator)
    unwrapped = lambda: accelerator.unwrap_model(model)  # noqa: E731

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_r1": None, "best_epoch": None}
    if resuming:
        if partial_ckpt:
            check_checkpoint(ckpt_dir, model)
        resume_from(accelerator, ckpt_dir, scheduler, state, models=[model], **({"strict": False} if partial_ckpt else {}))
        log_resumed(logger, ckpt_dir, state, explicit=args.resume)

    fmt = L.prompt_formatter(args.prompt_template)
    vsize = int(L.search_model(unwrapped()).get_input_embeddings().weight.shape[0])
    if not L.embeddings_tied(L.search_model(unwrapped())):
        vsize = int(L.search_model(unwrapped()).get_output_embeddings().weight.shape[0])
    indexes: dict = {}

    def index_of(name: str, gallery: Gallery):
        if name not in indexes:
            indexes[name] = gallery.build_index(vocab, vsize, device=device)
        return indexes[name]

    eval_dir, best_dir = out_dir / "eval", out_dir / "best"
    save_kwargs = dict(base_model=args.model, prompt_template=args.prompt_template, max_length=args.max_length)

    def run_eval(epoch: int) -> None:
        net = L.search_model(unwrapped())
        metrics_all = {}
        for split, queries, gallery in (("val", val_q, val_gallery), ("train", eval_train_q, train_gallery)):
            if not queries or gallery is None:
                continue
            with accelerator.autocast():
                records, metrics = evaluate_split(net, tokenizer, vocab, queries, gallery, args.num_beams,
                                                  args.eval_batch_size, device, index=index_of(split, gallery),
                                                  max_length=args.max_length, format_query=fmt, desc=f"eval {split}",
                                                  restrict_to_vokens=args.fast_search and not lora)
            if accelerator.is_main_process:
                write_run(records, eval_dir / f"run_{split}_epoch{epoch}.jsonl")
            metrics_all.update({f"eval/{split}/{k}": v for k, v in metrics.items()})
        metrics_all["epoch"] = epoch
        logger.log(metrics_all, step=state["global_step"])
        key, score, improved = select_best(state, metrics_all, epoch)
        if improved:
            if accelerator.is_main_process:
                L.save_retriever(unwrapped(), tokenizer, vocab, best_dir,
                                 info={"epoch": epoch, "selected_by": key, "metrics": metrics_all}, **save_kwargs)
            logger.summary({"best/epoch": epoch, **{f"best/{k}": v for k, v in metrics_all.items() if k.startswith("eval/")}})
            logger.info("new best %s=%.2f at epoch %d -> %s", key, score, epoch, best_dir)
        accelerator.wait_for_everyone()

    logger.info("train %d queries (%d micro-batches/epoch/process, %d steps total), val %d, test %d",
                len(train_q), micro_per_epoch, total_steps, len(val_q), len(test_q))
    logger.info(describe_batch(args.batch_size, accelerator.num_processes, args.grad_accum))
    def micro_step(idx, epoch: int, micro: int):
        batch = {k: v.to(device) for k, v in collate(idx).items() if k != "index"}
        with accelerator.autocast():
            return model(**batch, use_cache=False).loss, {}  # eq. 7 over code + EOS tokens

    result = train_epochs(accelerator, args, state, sampler=sampler, micro_per_epoch=micro_per_epoch, model=model,
                          params=list(model.parameters()), optimizer=optimizer, scheduler=scheduler, ckpt_dir=ckpt_dir,
                          logger=logger, micro_step=micro_step, run_eval=run_eval,
                          log_extra=(lambda: {"train/voken_lr": scheduler.get_last_lr()[-1]}) if rows else None,
                          on_epoch_start=lambda epoch: model.train())
    stopped, steps_this_run = result.pop("stopped"), result["steps_this_run"]
    if stopped:
        log_stopped(logger, stopped, state, args.epochs, steps_this_run)
        logger.finish()
        return result
    if not best_dir.is_dir():
        if accelerator.is_main_process:
            L.save_retriever(unwrapped(), tokenizer, vocab, best_dir,
                             info={"epoch": state["epoch"], "selected_by": "last"}, **save_kwargs)
        accelerator.wait_for_everyone()
    if test_q and not args.skip_test:
        tok, best, best_vocab, meta = L.load_retriever(best_dir, dtype=dtype, device=device)
        t0 = time.time()
        with accelerator.autocast():
            records, metrics = evaluate_split(best, tok, best_vocab, test_q, test_gallery, args.num_beams,
                                              args.eval_batch_size, device, max_length=args.max_length,
                                              format_query=fmt, desc="eval test", restrict_to_vokens=args.fast_search)
        seconds = time.time() - t0
        info = read_json(best_dir / "best.json")
        metrics = {**metrics, "system": L.SYSTEM, "split": "test", "model": args.model, "lora": lora,
                   "best_epoch": info.get("epoch"), "num_beams": args.num_beams, "fast_search": args.fast_search,
                   "test_queries_total": n_test_total,
                   "queries_per_s": len(test_q) / max(seconds, 1e-9)}
        if accelerator.is_main_process:
            write_run(records, eval_dir / "run_test.jsonl")
            write_json(metrics, eval_dir / "metrics_test.json")
        logger.log({f"eval/test/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                   step=state["global_step"])
        logger.summary({f"test/{k}": v for k, v in metrics.items()})
        result["test"] = metrics
    run.complete({k: v for k, v in result.get("test", {}).items() if k in ("R@1", "R@5", "R@10", "mean_rank", "best_epoch")})
    logger.finish()
    return result


if __name__ == "__main__":
    run_main(main)
