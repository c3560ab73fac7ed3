"""Train the seq2seq generative retriever (T5 or any HF seq2seq checkpoint).

Stage 1 (eq. 7): next-voken prediction from the caption; the vokens are new tokens whose
embeddings start from the RQ-VAE codebook (avg.retriever.vocab), one token range per level by
default (``--voken-tokens``).
Stage 2 (eqs. 8-10, ``--stage 2 --init-from <stage-1 out>/best``): L_gen + lambda * L_dis, where
L_dis is a listwise cross-entropy over the model's own constrained beam candidates, searched
among a chunk of ``--dis-gallery-size`` training images (default: as many as the val gallery, so
the candidates are as hard as at evaluation). L_gen is summed over the code (eq. 7, the scale of
s_j); the starting model is evaluated first (epoch 0), so ``best/`` is never worse on val.

Scoring (``--score``, avg.objectives.retrieval): ``children`` (default) renormalises each step over the
continuations the gallery's prefix tree allows -- in the training loss, in s_j and in the search;
``vocab`` is the full-vocabulary score of the paper and of HF ``generate``.
``--query-prefix P`` feeds the query's CLIP text feature as P soft tokens before its words
(avg.retriever.prefix; off in the paper's setting).

Diagnostics (eval/diagnostics_test.json, logged): R@K up to the beam (the list's recall), where
the gold code is lost (gold-is-top rate per position given the gold prefix, first position where
the top code differs), R@1 of images alone on their code vs sharing it, and the fit: R@K on a
chunk of training images as large as the val gallery, next to val.

    python -m avg.stages.train_retriever_t5 --data-dir outputs/demo/prepare_retriever_dataset \\
        --codes-dir outputs/demo/generate_codes --model data/demo/t5-demo --out-dir outputs/demo/train_retriever_t5
    python -m avg.stages.train_retriever_t5_stage2 --init-from outputs/demo/train_retriever_t5/best \\
        --data-dir outputs/demo/prepare_retriever_dataset --out-dir outputs/demo/train_retriever_t5_stage2

Outputs under --out-dir: ``best/`` (save_pretrained model + tokenizer + voken_vocab.json +
best.json, chosen by val R@1), ``checkpoints/last`` (accelerate state, for --resume),
``eval/run_<split>_epoch<e>.jsonl``, ``eval/metrics_test.json`` + ``eval/run_test.jsonl`` (the best
model on test), ``train.log``, ``metrics.jsonl``, ``stage.json``. Works under ``torchrun``/``accelerate launch``.

Interruptions: re-running the same command after a kill resumes from ``checkpoints/last``
(``--save-every-steps`` for mid-epoch checkpoints) when ``stage.json`` says a run of this
configuration was interrupted; on CPU with a fixed seed the result equals an uninterrupted run.
``--resume`` asks for it explicitly. A different configuration in --out-dir is refused unless
``--force``; a forced or repeated finished run starts fresh and deletes the old ``best/``,
``checkpoints/`` and ``eval/`` first. ``stage.json`` names the stage ``train_retriever_t5`` or, with
``--stage 2``, ``train_retriever_t5_stage2`` (avg.stages.train_retriever_t5_stage2).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from avg.artifacts.registry import T5_STAGES, manifest_name
from avg.retriever.data import Collator, QueryDataset
from avg.retriever.diagnostics import code_diagnostics, format_diagnostics
from avg.retriever.evaluate import evaluate_split, logits_vocab_size
from avg.search.gallery import Gallery
from avg.objectives.retrieval import LOSS_MODES, RetrievalObjective, mine_candidates, teacher_targets
from avg.retriever.prefix import (emb_dir_for, emb_for, feature_rows, gather_features, load_prefix,
                                  query_features)
from avg.retriever.teacher import CodeTeacher, GalleryTeacher
from avg.retriever.t5 import load_model_and_vocab, load_t5_retriever, recorded_val_eval, save_t5_retriever, val_signature
from avg.retriever.training import add_eval_and_checkpoint_args, check_data_matches_vocab, check_inputs, load_split
from avg.train.batches import EpochBatchSampler
from avg.train.loop import (checkpoint_dir, configure_deepspeed, describe_batch, linear_warmup_schedule, log_resumed,
                            log_stopped, make_accelerator, per_process_batch, resolve_mixed_precision, resume_from,
                            select_best, start_training_run, train_epochs)
from avg.retriever.vocab import VOCAB_FILE
from avg.artifacts.runfiles import write_run
from avg.core.io import InputError, read_json, write_json
from avg.core.seed import seeded_generator, seeded_subset, set_seed
from avg.core.stages import add_force_arg
from avg.core.cli import add_device_arg, run_main



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data-dir", required=True, help="prepare_retriever_dataset/ folder from avg.stages.prepare_retriever_dataset")
    g.add_argument("--codes-dir", default=None, help="generate_codes/ folder (stage 1: voken metadata and codebook.npy)")
    g.add_argument("--model", default="t5-base", help="stage 1: HF hub name or local path of a seq2seq checkpoint")
    g.add_argument("--init-from", default=None, help="a saved retriever to start from (stage 2: the stage-1 out-dir's best/)")
    g.add_argument("--out-dir", required=True, help="output folder")
    g.add_argument("--stage", type=int, choices=(1, 2), default=1, help="1: generative (eq. 7); 2: + discriminative (eq. 10)")
    g.add_argument("--no-voken-embedding", action="store_true", help="ablation: random voken embeddings instead of the codebook")
    g.add_argument("--voken-tokens", choices=("per-level", "shared"), default="per-level",
                   help="stage 1, shared codebook: one token range per level (rows start from the same codebook "
                        "vectors) or the paper's one token per codebook entry at every level")
    g.add_argument("--score", choices=LOSS_MODES, default="children",
                   help="how a code is scored in the loss, s_j and the search: renormalised over the gallery's "
                        "allowed continuations (children) or over the full vocabulary (vocab: paper / HF generate)")
    g.add_argument("--query-prefix", type=int, default=0,
                   help="stage 1: feed the query's CLIP text feature as this many soft tokens before its words (0: off, the paper)")
    g.add_argument("--emb-dir", default=None, help="prepare_emb/ folder of the query features (default: the one prepare_retriever_dataset/ was built from)")
    g.add_argument("--max-source-length", type=int, default=64, help="max caption tokens")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="training epochs (0: evaluate only)")
    g.add_argument("--batch-size", type=int, default=64, help="queries per micro-batch over all processes (the global batch; each of W processes takes 1/W)")
    g.add_argument("--max-train-queries", type=int, default=0, help="train on a seeded random subset of this many queries (0: all)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (paper: 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms)")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="fraction of steps of linear warmup")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                   help="autocast precision: auto = bf16 on a GPU that has it, else fp32 (fp16 is refused for T5)")
    g.add_argument("--allow-fp16", action="store_true", help="run T5 in fp16 anyway (it overflows: at your own risk)")
    g.add_argument("--seed", type=int, default=42, help="seed for init, data order, dropout, stage-2 replacement")
    add_device_arg(g)
    g = p.add_argument_group("stage 2 (eqs. 8-10)")
    g.add_argument("--dis-beams", type=int, default=10, help="b: beam candidates per query for L_dis")
    g.add_argument("--dis-weight", type=float, default=1.0, help="lambda: weight of L_dis (paper: 1)")
    g.add_argument("--dis-temperature", type=float, default=1.0, help="T: L_dis = CE(s / T, positive)")
    g.add_argument("--dis-lists", choices=("all", "found"), default="all",
                   help="all: every list, the positive put in by replacement when the beam missed it (the paper); "
                        "found: only lists whose beam found the positive (L_dis reorders the model's own top-b)")
    g.add_argument("--dis-gallery-size", type=int, default=-1,
                   help="search each training query among a chunk of this many train images (-1: the val gallery's "
                        "size; 0: the whole train gallery)")
    g.add_argument("--dis-teacher-mix", type=float, default=0.0,
                   help="alpha: L_dis's target is (1 - alpha) one-hot(positive) + alpha softmax(scale * CLIP cosine) over "
                        "the list, the cosine between the caption's and each candidate's image features in prepare_emb/ "
                        "(avg.retriever.teacher; 0: the paper's one-hot target)")
    g = p.add_argument_group("CLIP teacher (avg.retriever.teacher; off in the paper's setting)")
    g.add_argument("--gen-teacher-mix", type=float, default=0.0,
                   help="beta: each position of L_gen is (1 - beta) -log p(gold voken) + beta CE(q, p) over the vokens "
                        "that may follow the gold prefix, q the share of softmax(scale * CLIP cosine) over the training "
                        "gallery's images under each (needs --score children; stages 1 and 2)")
    g.add_argument("--teacher-scale", type=float, default=25.0,
                   help="the teacher's inverse temperature on the cosine (25: about the scale the reranker's fit finds "
                        "for the demo CLIP's cosine on val lists)")
    add_eval_and_checkpoint_args(p, eval_batch_size=32, eval_train_queries=1000, log_every=50,
                                 fast_search_help="score the search over voken logits only (faster; renormalised, see avg.search.beam)")
    p.add_argument("--reeval-start", action="store_true",
                   help="stage 2: evaluate the starting model on val even when the stage that saved it recorded that "
                        "evaluation with the same val queries, gallery, features and search settings (by default it is "
                        "reused: same metrics and run file, one val pass less)")
    g = p.add_argument_group("sample queries (eval/samples_test.{md,json} and a wandb table)")
    g.add_argument("--sample-queries", type=int, default=8, help="seeded test queries shown with gold and top-5 images (0: none)")
    g.add_argument("--image-root", default=None, help="image folder for the thumbnails (default: the one recorded in prepare_emb/index.json beside --data-dir)")
    g.add_argument("--annotations", default=None, help="Karpathy json mapping image ids to files under --image-root (default: prepare_retriever_dataset/meta.json's)")
    add_force_arg(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    check_inputs(args.data_dir, codes_dir=args.codes_dir if args.init_from is None else None, init_from=args.init_from)
    if args.query_prefix < 0:
        raise InputError(f"--query-prefix must be >= 0, got {args.query_prefix}")
    for flag, value in (("--dis-teacher-mix", args.dis_teacher_mix), ("--gen-teacher-mix", args.gen_teacher_mix)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{flag} must be in [0, 1], got {value}")
    if args.gen_teacher_mix > 0 and args.score != "children":
        raise InputError("--gen-teacher-mix needs --score children (the soft target is over the allowed vokens)")
    dis_teacher_on = args.stage == 2 and args.dis_teacher_mix > 0
    teacher_on = dis_teacher_on or args.gen_teacher_mix > 0
    accelerator = make_accelerator(args.device, grad_accum=args.grad_accum, mixed_precision=resolve_mixed_precision(
        args.mixed_precision, cpu=args.device == "cpu", t5=True, allow_fp16=args.allow_fp16))
    set_seed(args.seed)
    out_dir = Path(args.out_dir)
    ckpt_dir = checkpoint_dir(out_dir)
    data_dir = Path(args.data_dir)
    # the query features are an input like the data: a wrong prepare_emb/ fails here, before anything is written
    uses_prefix = args.query_prefix > 0 or (args.init_from is not None and load_prefix(args.init_from)[0] is not None)
    # the CLIP features read (query prefix, teacher) are an input: a rebuilt prepare_emb/ makes this stage stale
    emb_used = emb_dir_for(data_dir, args.emb_dir) if uses_prefix or teacher_on else args.emb_dir
    emb = emb_for(data_dir, emb_used) if uses_prefix or teacher_on else None
    text_features = emb.text_features if emb is not None else None
    encoder = dict(emb.index.get("encoder") or {}) if uses_prefix else None
    args.feature_dim = int(text_features.shape[1]) if uses_prefix else 0
    base = args.model if args.init_from is None else None  # a local folder, or a hub id fingerprinted by its commit
    started = start_training_run(accelerator, args, out_dir, manifest_name(T5_STAGES[args.stage]),
                                 inputs=[args.data_dir, args.codes_dir if args.init_from is None else None,
                                         args.init_from, base, emb_used],
                                 run_name=args.run_name or f"t5-stage{args.stage}", logger_name="avg.train_t5")
    if started.skipped is not None:
        return started.skipped
    run, logger, resuming = started.stage, started.logger, started.resuming

    tokenizer, model, vocab, prefix = load_model_and_vocab(args, logger)
    if prefix is not None and prefix.feature_dim != args.feature_dim:
        raise InputError(f"the query prefix expects {prefix.feature_dim}-dim features, prepare_emb/ has {args.feature_dim}")
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
        logger.info("training on a seeded subset of %d of %d training queries", args.max_train_queries, len(train_q))
        train_q = seeded_subset(train_q, args.max_train_queries, args.seed, 11)

    def features(queries, split):
        if prefix is None or not queries:
            return None
        return query_features(text_features, queries, source=str(data_dir / f"{split}.jsonl"))

    device = accelerator.device
    prefix = prefix.to(device) if prefix is not None else None
    train_rows = (feature_rows(train_q, text_features.shape[0], str(data_dir / "train.jsonl"))
                  if (prefix is not None or teacher_on) and train_q else None)
    vsize = logits_vocab_size(model)
    # the training gallery's prefix tree: the children loss normalises over it
    train_index = train_gallery.build_index(vocab, vsize, device=device) if train_q and train_gallery is not None else None
    # stage 2: chunks of the train gallery as large as the val gallery; a batch searches its chunk (eq. 8)
    chunks, chunk_indexes, groups = [], [], None
    if args.stage == 2 and train_q:
        size = (len(val_gallery) if val_gallery is not None else 0) if args.dis_gallery_size < 0 else args.dis_gallery_size
        chunks = train_gallery.chunks(size, args.seed)
        chunk_indexes = [c.build_index(vocab, vsize, device=device) for c in chunks]
        owner = {image_id: g for g, c in enumerate(chunks) for image_id in c.image_ids}
        groups = np.array([owner[q["image_id"]] for q in train_q], dtype=np.int64)
        logger.info("stage 2: candidates searched among %d chunk(s) of ~%d training images (beam %d)", len(chunks),
                    len(chunks[0]), args.dis_beams)
    teacher, gen_teacher = None, None
    image_rows = {str(im["image_id"]): r for r, im in enumerate(emb.images)} if teacher_on else {}
    if dis_teacher_on and chunks:
        teacher = CodeTeacher(emb.image_features, image_rows, chunks, vocab)
        logger.info("stage 2: L_dis target = %.2f one-hot + %.2f softmax(%.1f x CLIP cosine) over each list",
                    1 - args.dis_teacher_mix, args.dis_teacher_mix, args.teacher_scale)
    if args.gen_teacher_mix > 0 and train_index is not None:
        gen_teacher = GalleryTeacher(emb.image_features, image_rows, train_gallery, vocab, scale=args.teacher_scale,
                                     device=device)
        logger.info("L_gen target per position = %.2f gold voken + %.2f CLIP teacher (scale %.1f, %d training images)",
                    1 - args.gen_teacher_mix, args.gen_teacher_mix, args.teacher_scale, len(train_gallery))

    train_ds = QueryDataset(train_q, tokenizer, vocab, max_length=args.max_source_length) if train_q else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = Collator(train_ds, pad_id) if train_ds else None
    sampler = EpochBatchSampler(len(train_q), per_process_batch(args.batch_size, accelerator.num_processes),
                                seed=args.seed, groups=groups,
                                rank=accelerator.process_index, world_size=accelerator.num_processes)
    micro_per_epoch = sampler.batches_per_epoch() if train_q else 0
    steps_per_epoch = math.ceil(micro_per_epoch / args.grad_accum) if micro_per_epoch else 0
    total_steps = max(1, steps_per_epoch * args.epochs)

    objective = RetrievalObjective(model, dis_weight=args.dis_weight, temperature=args.dis_temperature, loss=args.score,
                                   index=train_index, prefix=prefix, score_len=vocab.num_levels,
                                   gallery_tokens=gen_teacher.tokens if gen_teacher is not None else None,
                                   gen_teacher_mix=args.gen_teacher_mix if gen_teacher is not None else 0.0)
    decay, no_decay = [], []
    for name, prm in objective.named_parameters():
        (no_decay if prm.ndim < 2 or "norm" in name.lower() else decay).append(prm)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    scheduler = linear_warmup_schedule(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    configure_deepspeed(accelerator, micro_batch=sampler.batch_size, grad_accum=args.grad_accum,
                        max_grad_norm=args.max_grad_norm)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    unwrapped = lambda: accelerator.unwrap_model(objective)  # noqa: E731

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_r1": None, "best_epoch": None}
    if resuming:
        resume_from(accelerator, ckpt_dir, scheduler, state, models=[objective])
        log_resumed(logger, ckpt_dir, state, explicit=args.resume)

    indexes: dict = {}

    def index_of(name: str, gallery: Gallery):
        if name not in indexes:
            indexes[name] = gallery.build_index(vocab, vsize, device=device)
        return indexes[name]

    # the fit diagnostic: training captions searched among as many training images as the val gallery holds
    eval_train_q, fit_gallery = [], None
    if args.eval_train_queries > 0 and train_q:
        fit_gallery = train_gallery.chunks(len(val_gallery) if val_gallery is not None else 0, args.seed + 1)[0]
        fit_ids = set(fit_gallery.image_ids)
        mine = [i for i, q in enumerate(train_q) if q["image_id"] in fit_ids]
        eval_train_q = [dict(train_q[i], qid=int(i)) for i in seeded_subset(mine, args.eval_train_queries, args.seed, 7)]
    eval_feats = {"val": features(val_q, "val"), "train": features(eval_train_q, "train")}

    eval_dir = out_dir / "eval"
    best_dir = out_dir / "best"
    info_base = {"stage": args.stage, "score": args.score, "max_source_length": args.max_source_length}

    signature = val_signature(args, val_q, val_gallery, eval_feats["val"], accelerator.mixed_precision,
                              accelerator.num_processes) if val_q and val_gallery is not None else None

    def run_eval(epoch: int, reuse_val: Optional[tuple[dict, Path]] = None) -> None:
        obj = unwrapped()
        metrics_all = {}
        if reuse_val is not None:  # the same evaluation of the same weights, recorded by the stage that saved them
            metrics_all.update(reuse_val[0])
            if accelerator.is_main_process:
                eval_dir.mkdir(parents=True, exist_ok=True)
                tmp = eval_dir / f".run_val_epoch{epoch}.jsonl.tmp"
                shutil.copyfile(reuse_val[1], tmp)
                os.replace(tmp, eval_dir / f"run_val_epoch{epoch}.jsonl")
        for split, queries, gallery in (("val", val_q, val_gallery), ("train", eval_train_q, fit_gallery)):
            if not queries or gallery is None or (split == "val" and reuse_val is not None):
                continue
            with accelerator.autocast():
                records, metrics = evaluate_split(obj.model, tokenizer, vocab, queries, gallery, args.num_beams,
                                                  args.eval_batch_size, device, index=index_of(split, gallery),
                                                  max_length=args.max_source_length, desc=f"eval {split}",
                                                  restrict_to_vokens=args.fast_search, normalize=args.score,
                                                  prefix=obj.prefix, query_features=eval_feats[split])
            if accelerator.is_main_process:
                write_run(records, eval_dir / f"run_{split}_epoch{epoch}.jsonl")
            metrics_all.update({f"eval/{split}/{k}": v for k, v in metrics.items()})
        metrics_all["epoch"] = epoch
        logger.log(metrics_all, step=state["global_step"])
        key, score, improved = select_best(state, metrics_all, epoch)
        if improved:
            if accelerator.is_main_process:
                save_t5_retriever(obj.model, tokenizer, vocab, best_dir,
                                  {**info_base, "epoch": epoch, "selected_by": key, "metrics": metrics_all,
                                   "val_signature": signature}, prefix=obj.prefix, encoder=encoder)
            logger.summary({"best/epoch": epoch, **{f"best/{k}": v for k, v in metrics_all.items() if k.startswith("eval/")}})
            logger.info("new best %s=%.2f at epoch %d -> %s", key, score, epoch, best_dir)
        accelerator.wait_for_everyone()

    logger.info("train %d queries (%d micro-batches/epoch/process, %d steps total), val %d, test %d, stage %d, "
                "score %s%s", len(train_q), micro_per_epoch, total_steps, len(val_q), len(test_q), args.stage, args.score,
                f", query prefix {prefix.num_tokens} tokens" if prefix is not None else "")
    logger.info(describe_batch(args.batch_size, accelerator.num_processes, args.grad_accum))
    if args.stage == 2 and args.epochs > 0 and state["global_step"] == 0 and state["best_r1"] is None:
        recorded = None if args.reeval_start or signature is None else recorded_val_eval(args.init_from, signature)
        if recorded is not None:
            logger.info("stage 2: the starting model's val evaluation (epoch 0) is the one %s recorded (same val "
                        "queries, gallery, features and search settings; --reeval-start runs it again): best/ is never "
                        "worse on val than it", args.init_from)
        else:
            logger.info("stage 2: evaluating the starting model (epoch 0): best/ is never worse on val than it")
        run_eval(0, reuse_val=recorded)
    voken_ids = vocab.voken_ids.to(device)  # the stage-2 candidate search's voken-only head

    def micro_step(idx, epoch: int, micro: int):
        batch = {k: v.to(device) for k, v in collate(idx).items()}
        feats = gather_features(text_features, train_rows[idx]).to(device) if train_rows is not None else None
        prefix_feats = feats if unwrapped().prefix is not None else None
        extra = {}
        if args.stage == 2:
            # eq. 8: the model's own top-b codes in this batch's gallery chunk, scored like the
            # evaluation search; their s_j are recomputed with gradient in the objective
            obj = unwrapped()
            chunk = int(groups[idx[0]])
            with accelerator.autocast():
                cands, cmask, pidx, found = mine_candidates(
                    obj.model, obj.prefix, batch["input_ids"], batch["attention_mask"], prefix_feats,
                    chunk_indexes[chunk], args.dis_beams, batch["labels"][:, :-1], eos_token_id=tokenizer.eos_token_id,
                    voken_ids=voken_ids, normalize=args.score, generator=seeded_generator(args.seed, epoch, micro))
            extra = {"candidates": cands, "positive_index": pidx, "candidate_mask": cmask,
                     "candidate_index": chunk_indexes[chunk], "list_mask": found if args.dis_lists == "found" else None}
            if teacher is not None:
                cos = teacher.scores(chunk, cands, feats)
                extra["targets"] = teacher_targets(cos, pidx, cmask, mix=args.dis_teacher_mix, scale=args.teacher_scale)
                teacher_top = cos.masked_fill(~cmask, float("-inf")).argmax(-1)
        if gen_teacher is not None:
            extra["teacher_sim"] = gen_teacher.similarity(feats)
        loss, parts = objective(batch["input_ids"], batch["attention_mask"], batch["labels"], query_features=prefix_feats,
                                **extra)
        logged = {"gen_loss": float(parts["gen"])}
        if args.stage == 2:
            logged["dis_loss"] = float(parts.get("dis", 0.0))
            logged["positive_found"] = float(found.float().mean())
            if teacher is not None:  # how often the teacher agrees with the one-hot target
                logged["teacher_top_is_positive"] = float((teacher_top == pidx).float().mean())
        return loss, logged

    result = train_epochs(accelerator, args, state, sampler=sampler, micro_per_epoch=micro_per_epoch, model=objective,
                          params=list(objective.parameters()), optimizer=optimizer, scheduler=scheduler, ckpt_dir=ckpt_dir,
                          logger=logger, micro_step=micro_step, run_eval=run_eval,
                          on_epoch_start=lambda epoch: objective.train())
    stopped, steps_this_run = result.pop("stopped"), result["steps_this_run"]
    if stopped:
        log_stopped(logger, stopped, state, args.epochs, steps_this_run)
        logger.finish()
        return result
    if not best_dir.is_dir():
        if accelerator.is_main_process:
            obj = unwrapped()
            save_t5_retriever(obj.model, tokenizer, vocab, best_dir, {**info_base, "epoch": state["epoch"], "selected_by": "last"},
                              prefix=obj.prefix, encoder=encoder)
        accelerator.wait_for_everyone()
    if test_q and not args.skip_test:
        best = load_t5_retriever(best_dir, device)
        test_feats = features(test_q, "test")
        t_eval = time.time()
        with accelerator.autocast():
            test_index = index_of("test", test_gallery)
            records, metrics = evaluate_split(best.model, tokenizer, vocab, test_q, test_gallery, args.num_beams,
                                              args.eval_batch_size, device, desc="eval test", index=test_index,
                                              restrict_to_vokens=args.fast_search, query_features=test_feats,
                                              **best.eval_kwargs())
        t_eval = time.time() - t_eval
        info = read_json(best_dir / "best.json")
        # one process is enough (the records are gathered on every one; only the main process writes)
        diagnostics = code_diagnostics(best.model, tokenizer, vocab, test_q, test_gallery, records, device,
                                       prefix=best.prefix, query_features=test_feats, batch_size=args.eval_batch_size,
                                       max_length=best.max_length, index=test_index, seed=args.seed) \
            if accelerator.is_main_process else {}
        fit = {split: {k.split("/")[-1]: v for k, v in (info.get("metrics") or {}).items() if k.startswith(f"eval/{split}/")}
               for split in ("val", "train")}
        diagnostics["fit"] = {split: {k: m[k] for k in ("R@1", "R@10", "gallery_size", "num_queries") if k in m}
                              for split, m in fit.items() if m}
        metrics = {"system": f"avg_t5_stage{args.stage}", "split": "test", **metrics,
                   "best_epoch": info.get("epoch"), "num_beams": args.num_beams, "stage": args.stage,
                   "score": best.normalize, "query_prefix": best.prefix.num_tokens if best.prefix is not None else 0,
                   "fast_search": args.fast_search, "eval_seconds": t_eval,
                   "queries_per_s": len(test_q) / max(t_eval, 1e-9),  # tokenise + search + rank, all processes
                   "diagnostics": diagnostics}
        logger.info("diagnostics (test): %s", format_diagnostics(diagnostics))
        if accelerator.is_main_process:
            write_run(records, eval_dir / "run_test.jsonl")
            write_json(diagnostics, eval_dir / "diagnostics_test.json")
            write_json(metrics, eval_dir / "metrics_test.json")
            if args.sample_queries > 0:
                from avg.data.sample_tables import log_sample_table, resolve_image_paths

                paths = resolve_image_paths(image_root=args.image_root, annotations=args.annotations, data_dir=args.data_dir)
                log_sample_table(logger, records, paths, n=args.sample_queries, seed=args.seed, out_dir=eval_dir, name="test")
        logger.log({f"eval/test/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=state["global_step"])
        logger.summary({f"test/{k}": v for k, v in metrics.items() if k != "diagnostics"})
        result["test"] = metrics
    run.complete({k: v for k, v in result.get("test", {}).items() if k in ("R@1", "R@5", "R@10", "R@20", "mean_rank", "best_epoch")})
    logger.finish()
    return result


if __name__ == "__main__":
    run_main(main)
