"""LoRA distillation as a Ray Train ``TorchTrainer`` job, and the held-out quality check.

:func:`train_loop_per_worker` runs on every worker (CPU by default, one GPU
each with ``train.use_gpu``; DDP when ``train.num_workers > 1``):

* base model + PEFT LoRA (``lora.*``); only the adapter trains;
* next-token loss on the rationale tokens only (prompt labels are -100);
* length-grouped batches split over ranks, gradient accumulation, clipping,
  linear warm-up then linear decay, bf16/fp16 autocast on GPUs;
* per epoch: train loss, validation loss on held-out users (token-weighted,
  summed over ranks), wall time, peak memory, and an adapter checkpoint
  (rank 0) through ``ray.train.report``;
* after the last epoch rank 0 generates rationales for up to
  ``eval_max_users`` held-out users with the adapter and with the adapter
  disabled (the same base), and reports their overlap with the teacher
  (:func:`overlap_report`).

:func:`core_train` is the same loop without Ray (``report=None``) so it can
be checked anywhere, including on a bare GPU machine.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _autocast(device: str, precision: str):
    import contextlib

    import torch

    if not device.startswith("cuda") or precision == "fp32":
        return contextlib.nullcontext(), None
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


def overlap_report(model, tokenizer, eval_set: dict, cfg: dict, device: str) -> dict[str, Any]:
    """Greedy rationales for the held-out prompts with the adapter and without it (same base).

    ``eval_set``: ``prompt_ids`` (token lists), ``targets`` (the trimmed
    teacher rationales trained on), ``full`` (the teacher's whole rationales).
    Returns mean ROUGE-L / token F1 of each against both references, the
    share of student answers that parse into three steps, and a few samples.
    """
    from slimrec.rationale import parse_rationale
    from slimrec.student.generate import generate_ids
    from slimrec.student.metrics import mean_overlap, prompt_dependence

    if not eval_set.get("prompt_ids"):
        return {}
    order = sorted(range(len(eval_set["prompt_ids"])), key=lambda i: len(eval_set["prompt_ids"][i]))
    ids = [eval_set["prompt_ids"][i] for i in order]
    targets = [eval_set["targets"][i] for i in order]
    full = [eval_set["full"][i] for i in order]
    kw = dict(max_new_tokens=cfg["max_new_tokens"], batch_size=cfg["eval_batch_size"], device=device,
              repetition_penalty=cfg.get("repetition_penalty", 1.0), kv_cache=cfg.get("kv_cache", "static"))
    model.eval()
    t0 = time.perf_counter()
    student = generate_ids(model, tokenizer, ids, **kw)
    t_student = time.perf_counter() - t0
    with model.disable_adapter():
        base = generate_ids(model, tokenizer, ids, **kw)
    s_txt, b_txt = [x[0] for x in student], [x[0] for x in base]
    s_t, b_t = mean_overlap(s_txt, targets), mean_overlap(b_txt, targets)
    s_f, b_f = mean_overlap(s_txt, full), mean_overlap(b_txt, full)
    ok = sum(parse_rationale(t, f)[1] is None for t, f, *_ in student)
    dep_s, dep_t = prompt_dependence(s_txt, targets), prompt_dependence(targets, targets)
    return {
        "heldout_eval_users": len(ids),
        "heldout_rouge_l_student": s_t["rouge_l"],
        "heldout_rouge_l_base": b_t["rouge_l"],
        "heldout_token_f1_student": s_t["token_f1"],
        "heldout_token_f1_base": b_t["token_f1"],
        "heldout_rouge_l_student_vs_full_teacher": s_f["rouge_l"],
        "heldout_rouge_l_base_vs_full_teacher": b_f["rouge_l"],
        # does the student read its prompt (slimrec.student.metrics.prompt_dependence)?
        "heldout_rouge_l_student_other_users": dep_s["other_users"],
        "heldout_rouge_l_teacher_other_users": dep_t["other_users"],
        "heldout_distinct_share_student": dep_s["distinct_share"],
        "heldout_distinct_share_teacher": dep_t["distinct_share"],
        "heldout_parse_ok_rate_student": ok / len(ids),
        "heldout_generate_seconds_student": round(t_student, 2),
        "heldout_output_tokens_mean_student": sum(x[2] for x in student) / len(ids),
        "samples": [
            {"teacher": targets[i], "student": s_txt[i], "base": b_txt[i]} for i in range(min(3, len(ids)))
        ],
        **constrained_report(model, tokenizer, eval_set, kw, order, cfg.get("pass_tokens")),
    }


def constrained_report(model, tokenizer, eval_set: dict, kw: dict, order: list[int],
                       pass_tokens: int | None = None) -> dict[str, Any]:
    """Fidelity under the stage's grammar (when ``eval_set`` has one), with the adapter and without it.

    ``eval_set``: ``grammar`` (EBNF), ``grammar_max_new_tokens``, ``title_ids`` (step-3 title -> item_id),
    ``teacher_item_ids`` (the ids the trimmed teacher rationale names). Per model: parse rate,
    micro precision / recall of the grounded step-3 ids against the teacher's, ROUGE-L against
    the trimmed teacher rationale, and how many answers hit a grammar dead end.
    """
    from slimrec.rationale import parse_rationale
    from slimrec.student.constrain import StudentGrammar, word_budget
    from slimrec.student.generate import generate_ids
    from slimrec.student.metrics import item_overlap, mean_overlap

    if not eval_set.get("grammar"):
        return {}
    vocab = int(model.get_output_embeddings().weight.shape[0])  # logits' last dim
    grammar = StudentGrammar(eval_set["grammar"], tokenizer, vocab, threads=1,
                             words=word_budget(eval_set.get("grammar_shape")))
    ids = [eval_set["prompt_ids"][i] for i in order]
    targets = [eval_set["targets"][i] for i in order]
    truth = [eval_set["teacher_item_ids"][i] for i in order]
    title_ids = eval_set["title_ids"]
    kw = {**kw, "max_new_tokens": eval_set["grammar_max_new_tokens"], "grammar": grammar,
          "pass_tokens": pass_tokens}
    out: dict[str, Any] = {"heldout_constrained_grammar_compile_seconds": round(grammar.compile_seconds, 2)}
    for who in ("student", "base"):
        t0 = time.perf_counter()
        if who == "student":
            res = generate_ids(model, tokenizer, ids, **kw)
        else:
            with model.disable_adapter():
                res = generate_ids(model, tokenizer, ids, **kw)
        secs = time.perf_counter() - t0
        parsed = [parse_rationale(t, f)[0] if f != "dead_end" else None for t, f, *_ in res]
        pred = [[title_ids[n] for n in p.item_names if n in title_ids] if p else [] for p in parsed]
        ov = item_overlap(pred, truth)
        out.update({
            f"heldout_constrained_parse_ok_rate_{who}": sum(p is not None for p in parsed) / len(ids),
            f"heldout_constrained_dead_ends_{who}": sum(r[1] == "dead_end" for r in res),
            f"heldout_constrained_item_precision_{who}": ov["item_precision"],
            f"heldout_constrained_item_recall_{who}": ov["item_recall"],
            f"heldout_constrained_rouge_l_{who}": mean_overlap([r[0] for r in res], targets)["rouge_l"],
            f"heldout_constrained_generate_seconds_{who}": round(secs, 2),
        })
    return out


def core_train(config: dict, rank: int = 0, world: int = 1, device: str = "cpu",
               report: Callable[[dict, str | None], None] | None = None, wrap: Callable | None = None):
    """The training loop: returns (peft model, last metrics). ``report(metrics, adapter_dir_or_None)`` per epoch.

    ``config`` keys: ``base_path``, ``train`` / ``val`` (lists of ``{"input_ids", "labels"}``),
    ``eval_set``, ``lora`` and ``train_cfg`` (dicts of the config sections), ``seed``,
    ``max_new_tokens``, ``eval_batch_size``. ``wrap`` turns the model into its DDP form.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from slimrec.student.data import collate_right, length_grouped_batches
    from slimrec.student.models import base_dtype, load_base, load_tokenizer
    from slimrec.torch_ops import fast_dropout

    tc, lc = config["train_cfg"], config["lora"]
    torch.manual_seed(config["seed"])
    if device == "cpu":
        torch.set_num_threads(tc.get("torch_threads") or max(1, (os.cpu_count() or 1) // world))
    tokenizer = load_tokenizer(config["base_path"], padding_side="left")
    autocast, amp_dtype = _autocast(device, tc["precision"])
    # On GPUs a large frozen base is held in the autocast dtype (a 7B base: 14 GB instead of 28 GB);
    # PEFT keeps the adapter weights in fp32. On CPUs, and for small bases, everything is fp32.
    base = load_base(config["base_path"], base_dtype(config["base_path"], amp_dtype), device)
    lora = LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"],
                      target_modules=list(lc["target_modules"]), task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(base, lora)
    fast_dropout(model)  # the LoRA branch's dropout: 19% of a CPU training step when drawn by bernoulli_
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    ddp = wrap(model) if wrap else model
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc["learning_rate"], weight_decay=tc["weight_decay"])

    train, val = config["train"], config["val"]
    lengths = [len(e["input_ids"]) for e in train]
    bs, accum = tc["batch_size"], tc["grad_accum_steps"]
    per_rank = (math.ceil(len(train) / bs) // world) or 1
    steps_per_epoch = math.ceil(per_rank / accum)
    epochs = max(tc["epochs"], math.ceil(tc.get("min_steps", 0) / steps_per_epoch))
    if epochs > tc["epochs"]:
        log.info("student: %d epochs instead of %d to reach %d optimizer steps", epochs, tc["epochs"], tc["min_steps"])
    total_steps = steps_per_epoch * epochs
    warm = max(1, int(tc["warmup_ratio"] * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total_steps - s) / max(1, total_steps - warm))
    )
    pad = tokenizer.pad_token_id
    history: dict[str, list] = {"train_loss": [], "val_loss": [], "epoch_seconds": [], "train_tokens": []}
    metrics: dict[str, Any] = {}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def token_loss(net, batch) -> tuple[torch.Tensor, int]:
        """Mean loss over the batch's label tokens and their count (labels shift by one inside the model)."""
        with autocast:
            out = net(**batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        return out.loss, n

    for epoch in range(epochs):
        t0 = time.perf_counter()
        batches = length_grouped_batches(lengths, bs, tc["length_group_size"], config["seed"] + epoch)
        batches = batches[: max(world, len(batches) // world * world)]  # every rank the same number of steps
        mine = batches[rank::world]
        model.train()
        loss_sum, tok_sum = 0.0, 0
        for i, b in enumerate(mine):
            batch = {k: v.to(device) for k, v in collate_right([train[j] for j in b], pad).items()}
            loss, n = token_loss(ddp, batch)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.item() * n
            tok_sum += n
            if rank == 0 and (i + 1) % max(1, len(mine) // 5) == 0:
                log.info("student epoch %d/%d: batch %d/%d, loss %.4f, %.1fs", epoch + 1, epochs, i + 1, len(mine),
                         loss_sum / max(tok_sum, 1), time.perf_counter() - t0)
            if (i + 1) % accum == 0 or i == len(mine) - 1:
                if scaler:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, tc["max_grad_norm"])
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        train_loss = _all_mean(loss_sum, tok_sum, world, device)
        model.eval()
        vs, vt = 0.0, 0
        with torch.no_grad():
            for s in range(rank * bs, len(val), bs * world):
                batch = {k: v.to(device) for k, v in collate_right(val[s : s + bs], pad).items()}
                loss, n = token_loss(model, batch)  # unwrapped: ranks may run different counts here
                vs += loss.item() * n
                vt += n
        val_loss = _all_mean(vs, vt, world, device) if val else None
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        history["epoch_seconds"].append(round(time.perf_counter() - t0, 2))
        history["train_tokens"].append(sum(lengths[j] for b in batches for j in b))
        metrics = {
            "epoch": epoch + 1,
            "epochs": epochs,
            "optimizer_steps": steps_per_epoch * (epoch + 1),
            "train_loss": train_loss,
            "val_loss": val_loss,
            "history": history,
            "trainable_params": trainable,
            "total_params": total,
            "world_size": world,
            "device": device,
            "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if device.startswith("cuda"):
            metrics["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        log.info("student epoch %d/%d: train loss %.4f, val loss %s, %.1fs", epoch + 1, epochs, train_loss,
                 f"{val_loss:.4f}" if val_loss is not None else "-", history["epoch_seconds"][-1])
        last = epoch == epochs - 1
        if last and rank == 0:
            metrics.update(overlap_report(model, tokenizer, config["eval_set"], config, device))
        if report is not None:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    model.save_pretrained(d)
                report(metrics, d if rank == 0 else None)
    return model, metrics


def _all_mean(total: float, count: int, world: int, device: str) -> float:
    """Token-weighted mean over all ranks (one all-reduce when DDP is on)."""
    if world > 1:
        import torch
        import torch.distributed as dist

        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / count if count else float("nan")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: rank, device and DDP from the Ray Train context; reports per epoch."""
    import ray.train
    import ray.train.torch

    from slimrec.student.models import set_offline

    set_offline()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = str(ray.train.torch.get_device())
    if device.startswith("cuda") and ":" not in device:
        device = "cuda:0"

    def report(metrics: dict, adapter: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(adapter) if adapter else None
        ray.train.report(metrics, checkpoint=ckpt)

    def wrap(model):
        return ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model

    core_train(config, rank, world, device, report, wrap)


def run_trainer(config: dict, train_cfg, storage_path: str, run_name: str):
    """Fit the ``TorchTrainer``; returns the ``ray.train.Result`` (metrics of the last epoch, its checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from slimrec.student.models import OFFLINE_ENV

    resources = {"CPU": train_cfg.cpus_per_worker}
    if train_cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": dict(OFFLINE_ENV)},
        ),
    )
    from slimrec.memory import fit_and_release

    return fit_and_release(trainer)
