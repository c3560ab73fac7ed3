"""Train the reranker: a causal LM (LoRA, or full fine-tuning for small models) + an MLP head scoring
each (query, candidate image tokens) pair of the retriever's top-k lists.

    python -m avg.stages.finetune_reranker_llama --data-dir outputs/demo/prepare_reranker_dataset --tokens-dir outputs/demo/convert_voken_to_seed \\
        --model data/demo/llama-demo --full-finetune --out-dir outputs/demo/finetune_reranker_llama
    accelerate launch -m avg.stages.finetune_reranker_llama ... --model <SEED-LLaMA path> --gradient-checkpointing

Loss per batch of lists: listwise softmax cross-entropy with the positive (avg.objectives.rerank)
+ ``--pointwise-weight`` x BCE. With fusion (``--fusion fixed|learned``) the listwise loss is taken
on ``head + w * retriever score`` for lists as the retriever returned them; on lists whose positive
was inserted (the retriever missed it; its score is unknown) it is taken on the head alone, so w
is learned only from lists that look like evaluation lists.

What the model sees of a candidate and how scores are fused: avg.reranker.model (``--image-prefix``,
``--feature-head``, ``--late-interaction``, ``--embed-fusion``; ``--fusion val`` trains the head
without the retriever's score and chooses its weight on val after each epoch).

Outputs under --out-dir: ``best/`` (avg.reranker.saving.save_reranker; chosen by reranked val R@1),
``best_control/`` when the data has the two-tower's lists (``prepare_reranker_dataset/control/``: the same
training run, its epoch and retriever weight chosen on the two-tower's val lists -- the control of every
reranker claim), ``checkpoints/last`` (accelerate state, for --resume), ``eval/run_val_epoch<e>.jsonl`` (and
``run_control_val_epoch<e>.jsonl``), ``train.log``, ``metrics.jsonl``, ``stage.json``.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from accelerate import DistributedType

from avg.artifacts.registry import manifest_name
from avg.metrics import format_metrics, retrieval_metrics
from avg.artifacts.runfiles import write_run
from avg.reranker import model as RM
from avg.reranker import lm_setup
from avg.reranker import saving
from avg.reranker import scoring
from avg.reranker.data import ListCollator, ListDataset, load_lists, shorten_list
from avg.reranker.embed import EMBED_FIT_BOUNDS, FeatureStore, fit_embed_weight
from avg.reranker.image_tokens import ImageTokens
from avg.objectives.rerank import listwise_loss, pointwise_loss
from avg.retriever import llama as L
from avg.train.batches import EpochBatchSampler
from avg.train.loop import (add_checkpoint_args, check_checkpoint, checkpoint_dir, configure_deepspeed,
                            describe_batch, linear_warmup_schedule, log_resumed, log_stopped, make_accelerator,
                            per_process_batch, resolve_mixed_precision, resume_from, select_best, start_training_run,
                            train_epochs, trainable_only_hooks)
from avg.core.cli import add_device_arg, run_main
from avg.core.io import InputError, read_json
from avg.core.seed import seeded_subset, set_seed
from avg.core.stages import add_force_arg

STAGE = manifest_name("finetune_reranker_llama")
CONTROL = "control"            # prepare_reranker_dataset/control/: the two-tower's val/test lists
BEST_CONTROL = "best_control"  # the same training run, its epoch chosen on the control's val lists


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data-dir", required=True, help="prepare_reranker_dataset/ folder (train.jsonl, val.jsonl, meta.json)")
    g.add_argument("--tokens-dir", required=True, help="convert_voken_to_seed/ folder (image_tokens.json)")
    g.add_argument("--model", required=True, help="causal LM: SEED-LLaMA path, a hub name or a local folder")
    g.add_argument("--out-dir", required=True, help="output folder")
    g.add_argument("--prompt-template", default=RM.DEFAULT_PROMPT_TEMPLATE,
                   help="text before the image tokens; must contain {query}")
    g.add_argument("--max-length", type=int, default=64, help="max prompt tokens (truncated from the left)")
    g.add_argument("--max-train-lists", type=int, default=0, help="a seeded subset of N training lists (0: all)")
    g.add_argument("--train-topk", type=int, default=0,
                   help="train on the first N candidates of each training list, the positive kept (0: the whole list; "
                        "val and test lists are never cut)")
    g.add_argument("--train-lists", choices=("all", "found"), default="all",
                   help="all: every training list; found: only lists whose miner found the positive in the first "
                        "--train-topk (lists with an inserted positive teach the head to overrule the cosine); "
                        "applied after --max-train-lists, so fewer lists remain")
    g.add_argument("--max-eval-lists", type=int, default=0, help="a seeded subset of N val lists for model selection (0: all)")
    g = p.add_argument_group("model")
    g.add_argument("--full-finetune", action="store_true", help="train every weight, no LoRA (small or random models)")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling alpha")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    g.add_argument("--lora-target-modules", default=L.DEFAULT_LORA_TARGETS, help="comma-separated module names, or 'all-linear'")
    g.add_argument("--head-inner", type=int, default=256, help="hidden width of the MLP scoring head (and of the grid head)")
    g.add_argument("--head-dropout", type=float, default=0.1, help="dropout inside the MLP head")
    g.add_argument("--emb-dir", default=None, help="prepare_emb/ folder: the CLIP features the options below read")
    g.add_argument("--image-prefix", type=int, default=0,
                   help="P soft tokens from the candidate's CLIP image feature before its image tokens (needs --emb-dir)")
    g.add_argument("--feature-head", action="store_true",
                   help="the head reads [h, v, t*v, t]: the LM state and the CLIP features of candidate and query")
    g.add_argument("--late-interaction", action="store_true",
                   help="the LM reads the query only, once; the head scores each candidate from it and the candidate's "
                        "features (implies --feature-head unless --grid-head sees the candidate; k times cheaper than "
                        "the cross-encoder)")
    g.add_argument("--grid-head", type=int, default=0, metavar="S",
                   help="late interaction: S query slots cross-attend each candidate's image grid (prepare_emb/image_grid.npy, "
                        "from prepare_emb --image-grid) and add their score (0: off)")
    g.add_argument("--query-pooling", choices=RM.QUERY_POOLING, default="last",
                   help="late interaction: the query's state is the LM's last token's, or the mean over the prompt's tokens")
    g.add_argument("--embed-fusion", choices=RM.EMBED_FUSION_MODES, default="none",
                   help="add u * cos(query, candidate) of the CLIP features to the score (u fixed or learned)")
    g.add_argument("--embed-weight", type=float, default=10.0, help="u (the initial value when learned)")
    g.add_argument("--fit-embed-weight", action="store_true",
                   help="set u (the start of a learned u, the value of a fixed one) to the value that minimises the "
                        "listwise loss of the cosine alone on the training lists, instead of --embed-weight")
    g.add_argument("--reuse-seed-image-rows", action="store_true",
                   help="a model with <img_*> tokens (SEED-LLaMA): keep its rows for the vokens' tokens (meaning-free: "
                        "SEED code k is not voken k) instead of initialising them from the codebook")
    g.add_argument("--fusion", choices=RM.FUSION_MODES, default="learned",
                   help="add w * retriever score to the head score: none, a fixed w, or a learned w")
    g.add_argument("--fusion-weight", type=float, default=1.0, help="w (the initial value when learned)")
    g = p.add_argument_group("loss and optimisation")
    g.add_argument("--pointwise-weight", type=float, default=0.0, help="weight of the pointwise BCE loss (0: listwise only)")
    g.add_argument("--temperature", type=float, default=1.0, help="temperature of the listwise softmax")
    g.add_argument("--epochs", type=int, default=1, help="training epochs")
    g.add_argument("--batch-size", type=int, default=8, help="lists per micro-batch over all processes (the global batch; each of W processes takes 1/W; x top-k sequences)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of the LM")
    g.add_argument("--head-lr", type=float, default=1e-3, help="peak learning rate of the head and the fusion weight")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on biases/norms)")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="fraction of steps of linear warmup")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                   help="autocast precision (auto: bf16 on a bf16-capable GPU, else no)")
    g.add_argument("--model-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the LM weights (auto: bf16 base under LoRA on a bf16 GPU, else float32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (scores "
                   "every (query, candidate) sequence in full: the KV cache of the shared prompt is not kept)")
    g.add_argument("--no-shared-prefix", action="store_true",
                   help="run every (query, candidate) sequence in full instead of computing each prompt once "
                        "(same scores, slower; needed with flash-attention-2)")
    g.add_argument("--seed", type=int, default=42, help="seed for init, data order and dropout")
    add_device_arg(g)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate on val every N epochs (0: after the last only)")
    g.add_argument("--eval-batch-size", type=int, default=16, help="lists per scoring batch")
    add_checkpoint_args(p, log_every=10)
    add_force_arg(p)
    return p.parse_args(argv)


def build_model(args, tokens: ImageTokens, device):
    """LM + image tokens (+ LoRA) + head -> (tokenizer, reranker, token ids, added)."""
    lora = not args.full_finetune
    dtype = L.resolve_dtype(args.model_dtype, lora=lora, device=device)
    tokenizer, lm = L.load_causal_lm(args.model, dtype=dtype)
    ids, added = lm_setup.ensure_image_tokens(tokenizer, lm, tokens.mapping, tokens.vectors, seed=args.seed, model_name=args.model,
                                              reuse_rows=args.reuse_seed_image_rows)
    if args.gradient_checkpointing:
        L.enable_checkpointing(lm)
    lm.config.use_cache = False
    if lora:
        lm = lm_setup.add_lora(lm, ids, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                               target_modules=args.lora_target_modules)
    else:
        lm_setup.freeze_unused_head(lm)
    torch.manual_seed(args.seed)
    reranker = RM.Reranker(lm, head_inner=args.head_inner, head_dropout=args.head_dropout, fusion=args.fusion,
                           fusion_weight=args.fusion_weight, feature_dim=args.feature_dim, image_prefix=args.image_prefix,
                           feature_head=args.feature_head or (args.late_interaction and not args.grid_head),
                           candidate_tokens=not args.late_interaction, embed_fusion=args.embed_fusion,
                           embed_weight=args.embed_weight, query_pooling=args.query_pooling,
                           grid_slots=args.grid_head, grid_width=args.grid_width, grid_cells=args.grid_cells)
    return tokenizer, reranker, ids, added, dtype


def main(argv=None) -> dict:
    args = parse_args(argv)
    L.check_template(args.prompt_template)
    data_dir = Path(args.data_dir)
    train_lists = load_lists(data_dir / "train.jsonl")
    if not train_lists:
        raise InputError(f"{data_dir / 'train.jsonl'}: no training lists")
    val_path = data_dir / "val.jsonl"
    val_lists = load_lists(val_path) if val_path.is_file() else []
    tokens = ImageTokens.load(args.tokens_dir)
    meta = read_json(data_dir / "meta.json") if (data_dir / "meta.json").is_file() else {}
    val_gallery = (meta.get("splits", {}).get("val") or {}).get("gallery_size")
    if args.fit_embed_weight and args.embed_fusion == "none":
        raise InputError("--fit-embed-weight sets the weight of the fused cosine: add --embed-fusion fixed or learned")
    if args.grid_head and not args.late_interaction:
        raise InputError("--grid-head scores candidates by late interaction: add --late-interaction")
    uses_features = args.image_prefix > 0 or args.feature_head or args.late_interaction or args.embed_fusion != "none"
    if uses_features and not args.emb_dir:
        raise InputError("--image-prefix, --feature-head, --late-interaction, --grid-head and --embed-fusion read CLIP "
                         "features: pass --emb-dir")
    store = FeatureStore.load(args.emb_dir) if uses_features else None
    args.feature_dim = store.dim if store is not None else 0
    args.grid_cells, args.grid_width = store.grid_shape(args.emb_dir) if args.grid_head else (0, 0)
    out_dir = Path(args.out_dir)
    mp = resolve_mixed_precision(args.mixed_precision, cpu=args.device == "cpu")
    accelerator = make_accelerator(args.device, grad_accum=args.grad_accum, mixed_precision=mp)
    ckpt_dir = checkpoint_dir(out_dir)
    started = start_training_run(accelerator, args, out_dir, STAGE,
                                 inputs=[args.data_dir, args.tokens_dir, args.model, args.emb_dir],
                                 run_name=args.run_name or "reranker", logger_name="avg.reranker",
                                 ignore=("no_shared_prefix",), stale=("best", BEST_CONTROL, "checkpoints", "eval"))
    if started.skipped is not None:
        return started.skipped
    stage, logger, resuming = started.stage, started.logger, started.resuming
    set_seed(args.seed)
    device = accelerator.device

    tokenizer, reranker, ids, added, dtype = build_model(args, tokens, device)
    lora = not args.full_finetune
    n_train = sum(p.numel() for p in reranker.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in reranker.parameters())
    logger.info("%s + %d image tokens (%s), %s, head %d, fusion %s (w=%.2f): %d / %d trainable weights",
                args.model, len(ids), "added" if added else "the model's own", "LoRA" if lora else "full fine-tuning",
                args.head_inner, args.fusion, args.fusion_weight, n_train, n_all)
    id_table = saving.image_token_ids(tokens, ids)
    fmt = L.prompt_formatter(args.prompt_template)
    train_lists = seeded_subset(train_lists, args.max_train_lists, args.seed, 1)
    if args.train_topk:
        train_lists = [shorten_list(x, args.train_topk) for x in train_lists]
    if args.train_lists == "found":
        n_lists = len(train_lists)
        train_lists = [x for x in train_lists if not x.get("inserted")]
        logger.info("--train-lists found: %d of %d training lists hold their positive without insertion",
                    len(train_lists), n_lists)
        if not train_lists:
            raise InputError(f"{data_dir / 'train.jsonl'}: no training list found its positive (--train-lists found)")
    val_lists = seeded_subset(val_lists, args.max_eval_lists, args.seed, 2)
    control_path = data_dir / CONTROL / "val.jsonl"  # the two-tower's val lists (prepare_reranker_dataset --control)
    control_lists = seeded_subset(load_lists(control_path), args.max_eval_lists, args.seed, 2) \
        if control_path.is_file() else []
    ds_kwargs = dict(max_length=args.max_length, image_prefix=args.image_prefix, features=store,
                     wrap=lm_setup.image_wrap_ids(tokenizer), image_grid=bool(args.grid_head))
    train_ds = ListDataset(train_lists, tokenizer, id_table, fmt, source=str(data_dir / "train.jsonl"), **ds_kwargs)
    val_ds = ListDataset(val_lists, tokenizer, id_table, fmt, source=str(val_path), **ds_kwargs) if val_lists else None
    control_ds = ListDataset(control_lists, tokenizer, id_table, fmt, source=str(control_path), **ds_kwargs) \
        if control_lists else None
    if args.fit_embed_weight:  # also on resume: a fixed u is a buffer, not in LoRA checkpoints (a learned one is restored)
        u = fit_embed_weight(train_ds.cosines(), train_ds.labels, temperature=args.temperature)
        with torch.no_grad():
            reranker.embed_weight.fill_(u)
        logger.info("embed weight u fitted on the %d training lists: %.2f (the cosine's best scale alone)",
                    len(train_ds), u)
        if u in (EMBED_FIT_BOUNDS[0], EMBED_FIT_BOUNDS[1]):
            logger.warning("the fitted u is at its bound %g: the cosine alone %s on these lists", u,
                           "orders them perfectly" if u == EMBED_FIT_BOUNDS[1] else "never prefers the positive")
    collate = ListCollator(train_ds)
    sampler = EpochBatchSampler(len(train_ds), per_process_batch(args.batch_size, accelerator.num_processes),
                                seed=args.seed, rank=accelerator.process_index,
                                world_size=accelerator.num_processes)
    micro_per_epoch = sampler.batches_per_epoch()
    steps_per_epoch = math.ceil(micro_per_epoch / args.grad_accum) if micro_per_epoch else 0
    total_steps = max(1, steps_per_epoch * args.epochs)

    head_params = [p for n, p in reranker.named_parameters() if p.requires_grad and not n.startswith("lm.")]
    decay, no_decay = [], []
    for n, p in reranker.named_parameters():
        if p.requires_grad and n.startswith("lm."):
            (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": head_params, "weight_decay": 0.0, "lr": args.head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr)
    scheduler = linear_warmup_schedule(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    configure_deepspeed(accelerator, micro_batch=sampler.batch_size, grad_accum=args.grad_accum,
                        max_grad_norm=args.max_grad_norm)
    model, optimizer = accelerator.prepare(reranker, optimizer)  # the schedule is checkpointed as JSON (resume_from)
    partial_ckpt = lora and accelerator.distributed_type != DistributedType.DEEPSPEED
    if partial_ckpt:
        trainable_only_hooks(accelerator)
    unwrapped = lambda: accelerator.unwrap_model(model)  # noqa: E731
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_r1": None, "best_epoch": None,
             "best_control_r1": None, "best_control_epoch": None}
    if resuming:
        if partial_ckpt:
            check_checkpoint(ckpt_dir, model)
        resume_from(accelerator, ckpt_dir, scheduler, state, models=[model], **({"strict": False} if partial_ckpt else {}))
        log_resumed(logger, ckpt_dir, state, explicit=args.resume)

    eval_dir, best_dir, control_dir = out_dir / "eval", out_dir / "best", out_dir / BEST_CONTROL
    save_kwargs = dict(base_model=args.model, prompt_template=args.prompt_template, max_length=args.max_length,
                       image_tokens_added=added,
                       extra_meta={"emb_dir": args.emb_dir, "list_depth": max(len(x["candidates"]) for x in val_lists)
                                   if val_lists else meta.get("topk")})

    def evaluate(ds, name: str, epoch: int) -> tuple[dict, float]:
        """Reranked metrics of one set of val lists and the retriever weight chosen on them (--fusion val; else the
        model's own); the model keeps that weight."""
        scores = scoring.score_lists(unwrapped(), ds, args.eval_batch_size, device, desc=f"eval {name}",
                                     autocast=accelerator.autocast, share_prefix=not args.no_shared_prefix,
                                     parts=args.fusion == "val")
        if args.fusion == "val":  # the retriever's weight: chosen on these val lists, after training
            weight, grid = scoring.choose_fusion_weight(ds.lists, scores, gallery_size=val_gallery)
            with torch.no_grad():
                unwrapped().fusion_weight.fill_(weight)
            logger.info("fusion weight chosen on %s: w=%s (%s)", name, weight,
                        ", ".join(f"w={r['weight']}: R@1 {r['R@1']:.2f}" for r in grid))
            scores = scoring.fuse_parts(scores, weight)
        records = scoring.reranked_records(ds.lists, scores)
        write_run(records, eval_dir / f"run_{name}_epoch{epoch}.jsonl")
        return retrieval_metrics(records, gallery_size=val_gallery), float(unwrapped().fusion_weight.detach())

    def run_eval(epoch: int) -> None:
        metrics_all = {"epoch": epoch}
        if control_ds is not None and accelerator.is_main_process:
            # the control first: the model is left with the retriever lists' fusion weight for best/ and training
            metrics, weight = evaluate(control_ds, "control_val", epoch)
            metrics_all.update({f"eval/control_val/{k}": v for k, v in metrics.items()})
            if state.get("best_control_r1") is None or metrics["R@1"] > state["best_control_r1"]:
                state["best_control_r1"], state["best_control_epoch"] = metrics["R@1"], epoch
                saving.save_reranker(unwrapped(), tokenizer, tokens, control_dir, **save_kwargs,
                                     info={"epoch": epoch, "selected_by": "eval/control_val/R@1", "fusion_weight": weight,
                                           "metrics": {k: v for k, v in metrics_all.items() if "control" in k}})
                logger.info("control (the two-tower's lists): new best R@1=%.2f at epoch %d -> %s", metrics["R@1"],
                            epoch, control_dir)
        if val_ds is not None and accelerator.is_main_process:
            metrics, _ = evaluate(val_ds, "val", epoch)
            metrics_all.update({f"eval/val/{k}": v for k, v in metrics.items()})
        metrics_all["fusion_weight"] = float(unwrapped().fusion_weight.detach())
        metrics_all["embed_weight"] = float(unwrapped().embed_weight.detach())
        logger.log(metrics_all, step=state["global_step"])
        key, score, improved = select_best(state, metrics_all, epoch) if "eval/val/R@1" in metrics_all else ("last", 0.0, True)
        if improved and accelerator.is_main_process:
            saving.save_reranker(unwrapped(), tokenizer, tokens, best_dir,
                                 info={"epoch": epoch, "selected_by": key, "metrics": metrics_all}, **save_kwargs)
            logger.info("new best %s=%.2f at epoch %d -> %s", key, score, epoch, best_dir)
        accelerator.wait_for_everyone()

    if val_ds is not None and state["global_step"] == 0 and accelerator.is_main_process:
        base = retrieval_metrics([{"ranked": x["candidates"], "gold": x["gold"]} for x in val_ds.lists], gallery_size=val_gallery)
        logger.info("val before reranking (retriever top-k order): %s", format_metrics(base))
        logger.log({f"eval/val_retriever/{k}": v for k, v in base.items()}, step=0)
    logger.info("train %d lists (%d micro-batches/epoch/process, %d steps), val %d lists", len(train_ds),
                micro_per_epoch, total_steps, len(val_lists))
    logger.info(describe_batch(args.batch_size, accelerator.num_processes, args.grad_accum))
    if val_ds is not None and state["global_step"] == 0 and state["best_r1"] is None and args.epochs > 0:
        logger.info("evaluating the starting model (epoch 0): best/ is never worse on val than it")
        run_eval(0)
    def micro_step(idx, epoch: int, micro: int):
        batch = {k: v.to(device) for k, v in collate(idx).items()}  # pairs flat + prompt/candidate form
        with accelerator.autocast():
            head, fused = model(**scoring.model_inputs(batch, device), share_prefix=not args.no_shared_prefix)
        # see module docstring; "head" is the base score (head + u * cos); --fusion val trains without the retriever
        scores = head if args.fusion == "val" else torch.where(batch["inserted"][:, None], head, fused)
        lw = listwise_loss(scores, batch["labels"], args.temperature)
        pw = pointwise_loss(head.masked_fill(~batch["valid"], 0.0), batch["labels"], batch["valid"]) \
            if args.pointwise_weight > 0 else lw.new_zeros(())
        loss = lw + args.pointwise_weight * pw + 0.0 * fused[batch["valid"]].sum()  # every param in the graph (DDP)
        return loss, {"listwise": float(lw.detach()), "pointwise": float(pw.detach())}

    result = train_epochs(accelerator, args, state, sampler=sampler, micro_per_epoch=micro_per_epoch, model=model,
                          params=list(model.parameters()), optimizer=optimizer, scheduler=scheduler, ckpt_dir=ckpt_dir,
                          logger=logger, micro_step=micro_step, run_eval=run_eval,
                          log_extra=lambda: {"train/fusion_weight": float(unwrapped().fusion_weight.detach()),
                                             "train/embed_weight": float(unwrapped().embed_weight.detach())},
                          on_epoch_start=lambda epoch: model.train())
    stopped, steps_this_run = result.pop("stopped"), result["steps_this_run"]
    train_seconds = result["train_seconds"]
    if stopped:
        log_stopped(logger, stopped, state, args.epochs, steps_this_run)
        logger.finish()
        return result
    if not best_dir.is_dir() and accelerator.is_main_process:
        saving.save_reranker(unwrapped(), tokenizer, tokens, best_dir, info={"epoch": state["epoch"], "selected_by": "last"},
                             **save_kwargs)
    accelerator.wait_for_everyone()
    result["best_epoch"], result["best_val_R@1"] = state.get("best_epoch"), state.get("best_r1")
    if control_ds is not None:
        result["best_control_epoch"], result["best_control_val_R@1"] = state["best_control_epoch"], state["best_control_r1"]
    logger.summary({k: v for k, v in result.items() if v is not None})
    logger.info("done: %d steps in %.1f s (%.3f s/step); best %s", steps_this_run, train_seconds,
                result["s_per_step"] or 0.0, best_dir)
    logger.finish()
    stage.complete(summary={k: v for k, v in result.items() if k in ("global_step", "best_epoch", "best_val_R@1")})
    return result


if __name__ == "__main__":
    run_main(main)
