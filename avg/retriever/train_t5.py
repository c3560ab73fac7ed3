"""Train the seq2seq generative retriever (T5 or any HF seq2seq checkpoint).

Stage 1 (eq. 7): next-voken prediction from the caption; the vokens are new tokens whose
embeddings start from the RQ-VAE codebook (avg.retriever.vocab).
Stage 2 (eqs. 8-10, ``--stage 2 --init-from <stage-1 out>/best``): L_gen + lambda * L_dis, where
L_dis is a listwise cross-entropy over the model's own constrained beam candidates.

    python -m avg.retriever.train_t5 --data-dir outputs/demo/retriever_data \\
        --codes-dir outputs/demo/codes --model data/demo/t5-demo --out-dir outputs/demo/retriever_t5
    python -m avg.retriever.train_t5 --stage 2 --init-from outputs/demo/retriever_t5/best \\
        --data-dir outputs/demo/retriever_data --out-dir outputs/demo/retriever_t5_stage2

Outputs under --out-dir: ``best/`` (save_pretrained model + tokenizer + voken_vocab.json +
best.json, chosen by val R@1), ``checkpoints/last`` (accelerate state, for --resume),
``eval/run_<split>_epoch<e>.jsonl``, ``eval/metrics_test.json`` + ``eval/run_test.jsonl`` (the best
model on test), ``train.log``, ``metrics.jsonl``, ``stage.json``. Works under ``torchrun``/``accelerate launch``.

Interruptions: re-running the same command after a kill resumes from ``checkpoints/last``
(``--save-every-steps`` for mid-epoch checkpoints) when ``stage.json`` says a run of this
configuration was interrupted; on CPU with a fixed seed the result equals an uninterrupted run.
``--resume`` asks for it explicitly. A different configuration in --out-dir is refused unless
``--force``; a forced or repeated finished run starts fresh and deletes the old ``best/``,
``checkpoints/`` and ``eval/`` first. Stages 1 and 2 share the stage name ``train_t5``.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, get_linear_schedule_with_warmup

from avg.retriever.data import Collator, EpochBatchSampler, QueryDataset, read_codes
from avg.retriever.evaluate import evaluate_split, logits_vocab_size
from avg.retriever.gallery import Gallery
from avg.retriever.losses import RetrievalObjective, build_candidates
from avg.retriever.search import constrained_beam_search
from avg.retriever.training import (STATE_FILE, add_eval_and_checkpoint_args, check_data_matches_vocab, check_inputs,
                                    load_split, resume_from, select_best, train_epochs)
from avg.retriever.vocab import VOCAB_FILE, VokenVocab
from avg.eval.runfiles import write_run
from avg.utils.io import InputError, read_json, replace_dir, write_json
from avg.utils.seed import set_seed
from avg.utils.stages import add_force_arg, begin_stage, skip_if_done
from avg.utils.tracking import RunLogger, get_logger
from avg.utils.cli import run_main



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data-dir", required=True, help="retriever_data/ folder from avg.retriever.prepare_dataset")
    g.add_argument("--codes-dir", default=None, help="codes/ folder (stage 1: voken metadata and codebook.npy)")
    g.add_argument("--model", default="t5-base", help="stage 1: HF hub name or local path of a seq2seq checkpoint")
    g.add_argument("--init-from", default=None, help="a saved retriever to start from (stage 2: the stage-1 out-dir's best/)")
    g.add_argument("--out-dir", required=True, help="output folder")
    g.add_argument("--stage", type=int, choices=(1, 2), default=1, help="1: generative (eq. 7); 2: + discriminative (eq. 10)")
    g.add_argument("--no-voken-embedding", action="store_true", help="ablation: random voken embeddings instead of the codebook")
    g.add_argument("--max-source-length", type=int, default=64, help="max caption tokens")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="training epochs (0: evaluate only)")
    g.add_argument("--batch-size", type=int, default=64, help="queries per device per micro-batch")
    g.add_argument("--max-train-queries", type=int, default=0, help="train on a seeded random subset of this many queries (0: all)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (paper: 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms)")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="fraction of steps of linear warmup")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="autocast precision on GPU")
    g.add_argument("--seed", type=int, default=42, help="seed for init, data order, dropout, stage-2 replacement")
    g.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is present")
    g = p.add_argument_group("stage 2 (eqs. 8-10)")
    g.add_argument("--dis-beams", type=int, default=10, help="b: beam candidates per query for L_dis")
    g.add_argument("--dis-weight", type=float, default=1.0, help="lambda: weight of L_dis (paper: 1)")
    g.add_argument("--dis-temperature", type=float, default=1.0, help="T: L_dis = CE(s / T, positive)")
    add_eval_and_checkpoint_args(p, eval_batch_size=32, eval_train_queries=200, log_every=50,
                                 fast_search_help="score the search over voken logits only (faster; renormalised, see avg.retriever.search)")
    g = p.add_argument_group("sample queries (eval/samples_test.{md,json} and a wandb table)")
    g.add_argument("--sample-queries", type=int, default=8, help="seeded test queries shown with gold and top-5 images (0: none)")
    g.add_argument("--image-root", default=None, help="image folder for the thumbnails (default: the one recorded in emb/index.json beside --data-dir)")
    g.add_argument("--annotations", default=None, help="Karpathy json mapping image ids to files under --image-root (default: retriever_data/meta.json's)")
    add_force_arg(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- setup helpers
def load_model_and_vocab(args, log):
    """Stage 1: base checkpoint + new vokens; stage 2: a saved retriever with its vokens."""
    if args.stage == 2 or (args.init_from and args.stage == 1):
        if not args.init_from:
            raise InputError("--stage 2 needs --init-from <stage-1 out-dir>/best")
        src = args.init_from
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForSeq2SeqLM.from_pretrained(src)
        vocab = VokenVocab.load(src, tokenizer)
        log.info("loaded retriever %s (%d vokens)", src, len(vocab.tokens()))
        return tokenizer, model, vocab
    if not args.codes_dir:
        raise InputError("stage 1 needs --codes-dir (voken metadata and codebook.npy)")
    codes = read_codes(args.codes_dir, with_codebook=not args.no_voken_embedding)
    vocab = VokenVocab.from_meta(codes.meta, source=os.path.join(args.codes_dir, "codes.json"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
    if not getattr(model.config, "is_encoder_decoder", False):
        raise InputError(f"--model {args.model}: not an encoder-decoder model (use the LLaMA retriever)")
    init = "random" if args.no_voken_embedding else "codebook"
    if init == "codebook" and codes.codebook is None:
        raise InputError(f"{args.codes_dir}: codebook.npy not found (or pass --no-voken-embedding)")
    vocab.add_to(tokenizer, model, codes.codebook, init=init, seed=args.seed)
    log.info("added %d voken tokens to %s (init=%s)", len(vocab.tokens()), args.model, init)
    return tokenizer, model, vocab


def save_retriever(model, tokenizer, vocab, out: Path, info: dict) -> None:
    """save_pretrained of model + tokenizer + voken metadata, swapped into place atomically."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(vocab.to_dict(), tmp / VOCAB_FILE)
    write_json(info, tmp / "best.json")
    replace_dir(tmp, out)


def _step_generator(seed: int, epoch: int, micro: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, micro-batch): resumable stage-2 sampling."""
    state = int(np.random.SeedSequence([seed, epoch, micro]).generate_state(1)[0])
    return torch.Generator().manual_seed(state)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    check_inputs(args.data_dir, codes_dir=args.codes_dir if args.init_from is None else None, init_from=args.init_from)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    set_seed(args.seed)
    out_dir = Path(args.out_dir)
    ckpt_dir = out_dir / "checkpoints" / "last"
    # every rank reads the manifest before the main process rewrites it, so all take the same decision
    base = args.model if args.init_from is None and Path(args.model).exists() else None
    run = begin_stage(out_dir, "train_t5", vars(args), force=args.force, mark_running=False,
                      inputs=[args.data_dir, args.codes_dir if args.init_from is None else None, args.init_from, base],
                      ignore=("save_every_steps", "stop_after_steps"))
    accelerator.wait_for_everyone()
    if run.up_to_date and skip_if_done():
        get_logger("avg.train_t5").info("train_t5: outputs in %s are complete and up to date; skipping", out_dir)
        return dict(run.previous.get("summary") or {})
    interrupted = not run.fresh and run.previous.get("status") == "running"
    resuming = (args.resume or interrupted) and (ckpt_dir / STATE_FILE).is_file()
    run.running()
    logger = RunLogger(out_dir, project=args.wandb_project, run_name=args.run_name or f"t5-stage{args.stage}",
                       config=vars(args), resume=resuming)
    if args.resume and not resuming:
        logger.info("--resume: no checkpoint at %s, starting fresh", ckpt_dir)
    if not resuming and accelerator.is_main_process:
        for stale in (out_dir / "best", out_dir / "checkpoints", out_dir / "eval"):
            if stale.exists():  # a fresh run must never report an older run's model or metrics
                logger.info("fresh run: removing %s from an earlier run", stale)
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()

    tokenizer, model, vocab = load_model_and_vocab(args, logger)
    data_dir = Path(args.data_dir)
    check_data_matches_vocab(data_dir, vocab, Path(args.init_from) / VOCAB_FILE if args.init_from
                             else Path(args.codes_dir) / "codes.json")
    train_q, train_gallery = load_split(data_dir, "train", vocab.code_len, args.collision_seed)
    val_q, val_gallery = load_split(data_dir, "val", vocab.code_len, args.collision_seed)
    test_q, test_gallery = load_split(data_dir, "test", vocab.code_len, args.collision_seed)
    meta_path = data_dir / "meta.json"
    if meta_path.is_file() and read_json(meta_path).get("transductive"):
        logger.warning("!!! TRANSDUCTIVE training data (%s): pseudo queries on val/test gallery images !!!", meta_path)
    if args.epochs > 0 and not train_q:
        raise InputError(f"{data_dir / 'train.jsonl'}: no training queries")
    if args.max_train_queries and args.max_train_queries < len(train_q):
        # a seeded subset for reduced schedules (e.g. the CPU demo's stage 2); order kept
        keep = np.sort(np.random.default_rng([args.seed, 11]).choice(len(train_q), args.max_train_queries, replace=False))
        logger.info("training on a seeded subset of %d of %d training queries", len(keep), len(train_q))
        train_q = [train_q[i] for i in keep]

    device = accelerator.device
    train_ds = QueryDataset(train_q, tokenizer, vocab, max_length=args.max_source_length) if train_q else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = Collator(train_ds, pad_id) if train_ds else None
    sampler = EpochBatchSampler(len(train_q), args.batch_size, seed=args.seed,
                                rank=accelerator.process_index, world_size=accelerator.num_processes)
    micro_per_epoch = sampler.batches_per_epoch() if train_q else 0
    steps_per_epoch = math.ceil(micro_per_epoch / args.grad_accum) if micro_per_epoch else 0
    total_steps = max(1, steps_per_epoch * args.epochs)

    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if prm.ndim < 2 or "norm" in name.lower() else decay).append(prm)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    objective = RetrievalObjective(model, dis_weight=args.dis_weight, temperature=args.dis_temperature)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    unwrapped = lambda: accelerator.unwrap_model(objective).model  # noqa: E731

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_r1": None, "best_epoch": None}
    if resuming:
        resume_from(accelerator, ckpt_dir, scheduler, state, models=[objective])
        logger.warning("resuming from %s (step %d, epoch %d)%s", ckpt_dir, state["global_step"], state["epoch"] + 1,
                       "" if args.resume else ": this configuration was interrupted here")

    vsize = logits_vocab_size(unwrapped())
    indexes: dict = {}

    def index_of(name: str, gallery: Gallery):
        if name not in indexes:
            indexes[name] = gallery.build_index(vocab, vsize, device=device)
        return indexes[name]

    eval_train_q = []
    if args.eval_train_queries > 0 and train_q:
        n = min(args.eval_train_queries, len(train_q))
        pick = np.sort(np.random.default_rng([args.seed, 7]).choice(len(train_q), n, replace=False))
        eval_train_q = [dict(train_q[i], qid=int(i)) for i in pick]

    eval_dir = out_dir / "eval"
    best_dir = out_dir / "best"

    def run_eval(epoch: int) -> None:
        model_ = unwrapped()
        metrics_all = {}
        for split, queries, gallery in (("val", val_q, val_gallery), ("train", eval_train_q, train_gallery)):
            if not queries or gallery is None:
                continue
            with accelerator.autocast():
                records, metrics = evaluate_split(model_, tokenizer, vocab, queries, gallery, args.num_beams,
                                                  args.eval_batch_size, device, index=index_of(split, gallery),
                                                  max_length=args.max_source_length, desc=f"eval {split}",
                                                  restrict_to_vokens=args.fast_search)
            if accelerator.is_main_process:
                write_run(records, eval_dir / f"run_{split}_epoch{epoch}.jsonl")
            metrics_all.update({f"eval/{split}/{k}": v for k, v in metrics.items()})
        metrics_all["epoch"] = epoch
        logger.log(metrics_all, step=state["global_step"])
        key, score, improved = select_best(state, metrics_all, epoch)
        if improved:
            if accelerator.is_main_process:
                save_retriever(model_, tokenizer, vocab, best_dir,
                               {"epoch": epoch, "selected_by": key, "metrics": metrics_all, "stage": args.stage})
            logger.summary({"best/epoch": epoch, **{f"best/{k}": v for k, v in metrics_all.items() if k.startswith("eval/")}})
            logger.info("new best %s=%.2f at epoch %d -> %s", key, score, epoch, best_dir)
        accelerator.wait_for_everyone()

    train_index = index_of("train", train_gallery) if args.stage == 2 and train_q else None
    logger.info("train %d queries (%d micro-batches/epoch/process, %d steps total), val %d, test %d, stage %d",
                len(train_q), micro_per_epoch, total_steps, len(val_q), len(test_q), args.stage)
    def micro_step(idx, epoch: int, micro: int):
        batch = {k: v.to(device) for k, v in collate(idx).items()}
        extra = {}
        if args.stage == 2:
            # eq. 8: the model's own top-b codes over the train gallery (voken-only fast path:
            # it only picks candidates; their scores s_j are recomputed with gradient below)
            model_ = unwrapped()
            with torch.no_grad(), accelerator.autocast():
                model_.eval()
                out = constrained_beam_search(model_, batch["input_ids"], batch["attention_mask"], train_index,
                                              args.dis_beams, decoder_start_token_id=model_.config.decoder_start_token_id,
                                              eos_token_id=tokenizer.eos_token_id, voken_ids=vocab.voken_ids.to(device))
                model_.train()
            cands, cmask, pidx = build_candidates(out.sequences, out.num_valid, batch["labels"][:, :-1],
                                                  generator=_step_generator(args.seed, epoch, micro))
            extra = {"candidates": cands, "positive_index": pidx, "candidate_mask": cmask}
        loss, parts = objective(batch["input_ids"], batch["attention_mask"], batch["labels"], **extra)
        logged = {"gen_loss": float(parts["gen"])}
        if args.stage == 2:
            logged["dis_loss"] = float(parts.get("dis", 0.0))
        return loss, logged

    result = train_epochs(accelerator, args, state, sampler=sampler, micro_per_epoch=micro_per_epoch, model=objective,
                          params=list(objective.parameters()), optimizer=optimizer, scheduler=scheduler, ckpt_dir=ckpt_dir,
                          logger=logger, micro_step=micro_step, run_eval=run_eval,
                          on_epoch_start=lambda epoch: objective.train())
    stopped, steps_this_run = result.pop("stopped"), result["steps_this_run"]
    if stopped:
        logger.info("stopped after %d steps (--stop-after-steps); resume with --resume", steps_this_run)
        logger.finish()
        return result
    if not best_dir.is_dir():
        if accelerator.is_main_process:
            save_retriever(unwrapped(), tokenizer, vocab, best_dir, {"epoch": state["epoch"], "selected_by": "last", "stage": args.stage})
        accelerator.wait_for_everyone()
    if test_q and not args.skip_test:
        best = AutoModelForSeq2SeqLM.from_pretrained(best_dir).to(device)
        t_eval = time.time()
        with accelerator.autocast():
            records, metrics = evaluate_split(best, tokenizer, vocab, test_q, test_gallery, args.num_beams,
                                              args.eval_batch_size, device, max_length=args.max_source_length,
                                              desc="eval test", restrict_to_vokens=args.fast_search)
        t_eval = time.time() - t_eval
        info = read_json(best_dir / "best.json")
        metrics = {"system": f"avg_t5_stage{args.stage}", "split": "test", **metrics,
                   "best_epoch": info.get("epoch"), "num_beams": args.num_beams, "stage": args.stage,
                   "fast_search": args.fast_search, "eval_seconds": t_eval,
                   "queries_per_s": len(test_q) / max(t_eval, 1e-9)}  # tokenise + search + rank, all processes
        if accelerator.is_main_process:
            write_run(records, eval_dir / "run_test.jsonl")
            write_json(metrics, eval_dir / "metrics_test.json")
            if args.sample_queries > 0:
                from avg.eval.wandb_samples import log_sample_table, resolve_image_paths

                paths = resolve_image_paths(image_root=args.image_root, annotations=args.annotations, data_dir=args.data_dir)
                log_sample_table(logger, records, paths, n=args.sample_queries, seed=args.seed, out_dir=eval_dir, name="test")
        logger.log({f"eval/test/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=state["global_step"])
        logger.summary({f"test/{k}": v for k, v in metrics.items()})
        result["test"] = metrics
    run.complete({k: v for k, v in result.get("test", {}).items() if k in ("R@1", "R@5", "R@10", "mean_rank", "best_epoch")})
    logger.finish()
    return result


if __name__ == "__main__":
    run_main(main)
