"""Checkpoints and where a run starts.

A checkpoint counts only once marked complete (`COMPLETE_MARKER`, written last); old ones are
deleted only after the new one is marked, so a kill at any moment leaves the last complete one.
Each marker names its run (`run_id`: a hash of the config keys that change what training does) and
the sum of the losses so far, so a resumed run reports the whole run's mean loss. `start_run`
decides, before anything is written, whether `train.output_dir` continues (`train.resume: auto`,
the default: the same run's latest complete checkpoint), starts over (`fresh`) or is refused (it
holds another run's). PPO's own loop writes and reads its checkpoints here too; trainer stages
use the Trainer's, marked and rotated by `CompleteCheckpointCallback`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from lmforge import distributed
from lmforge.artifacts import atomic_folder, write_atomic
from lmforge.config import RunConfig
from lmforge.config.train import DistributedConfig
from lmforge.training.compat import losses_so_far

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "LMFORGE_COMPLETE"
RUN_FILE = "run.json"  # the run this folder holds: its id and the config keys it was hashed from
# train: keys that change neither which steps run nor what they compute (where files go, how often
# they are written, what is shown); a run may resume with them changed.
UNTRACKED = (
    "output_dir",
    "resume",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "tensorboard",
    "progress",
)
# What an earlier start of a run leaves besides its result, removed when a run starts over.
RESULTS = ("adapter", "model", "reward", "value_head.safetensors")  # what stages save at the end
RUN_FILES = ("metrics.jsonl", "loss.png", "samples.jsonl", "runs", RUN_FILE)


def run_id(config: RunConfig) -> str:
    """The run's identity: a hash of every config key but the `UNTRACKED` train keys."""
    return hashlib.sha256(json.dumps(tracked(config), sort_keys=True).encode()).hexdigest()[:16]


def tracked(config: RunConfig) -> dict:
    raw = config.model_dump(mode="json")
    raw["train"] = {k: v for k, v in raw["train"].items() if k not in UNTRACKED}
    if raw["train"].get("distributed") == DistributedConfig().model_dump(mode="json"):
        del raw["train"]["distributed"]  # the default: runs from before the key existed keep their id
    return raw


def mark_complete(checkpoint: Path, step: int, run: str | None = None, loss_sum: float | None = None) -> None:
    """Written last, atomically: a checkpoint without it was interrupted mid-save. It records how
    many processes wrote it: a run resumes only with as many (each reloads its own data position
    and random state)."""
    marker = {
        "step": step,
        "time": time.time(),
        "run": run,
        "loss_sum": loss_sum,
        "world_size": distributed.world_size(),
    }
    write_atomic(checkpoint / COMPLETE_MARKER, json.dumps(marker))


def read_marker(checkpoint: Path) -> dict:
    """A complete checkpoint's marker ({} for one written before markers held anything)."""
    try:
        return json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8")) or {}
    except (OSError, ValueError):
        return {}


def rotate(output_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints (None or 0: all); an incomplete one older than
    the newest complete one is a save that was cut off, and goes too. Called only after a new
    checkpoint is marked complete."""
    complete = complete_checkpoints(output_dir)
    if not complete:
        return
    newest = _step(complete[-1])
    for child in output_dir.iterdir():
        match = CHECKPOINT.match(child.name)
        if match and child.is_dir() and child not in complete and int(match.group(1)) < newest:
            shutil.rmtree(child, ignore_errors=True)
    for old in complete[:-limit] if limit else []:
        shutil.rmtree(old, ignore_errors=True)


def _step(checkpoint: Path) -> int:
    return int(CHECKPOINT.match(checkpoint.name).group(1))


class CompleteCheckpointCallback(TrainerCallback):
    """After the Trainer writes a checkpoint: its arguments as JSON instead of a pickle, the marker
    (run id, loss sum), then rotation (the Trainer's own is off: it deleted old checkpoints before
    the new one was marked, so a kill there left none complete). On a resumed run, the final
    `train_loss` becomes the whole run's mean, not only the resumed steps'."""

    def __init__(self, run: str, limit: int | None) -> None:
        self.run, self.limit = run, limit
        self.trainer = None  # set by `training.trainer.stage_trainer`: the loss sum is read from it
        self.resumed: dict | None = None  # the marker of the checkpoint this run resumed from

    def on_train_begin(self, args, state, control, **kw):
        if state.global_step > 0:
            self.resumed = read_marker(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            self.resumed.setdefault("step", state.global_step)

    def on_save(self, args, state, control, **kw):
        # Trainer calls on_save after every file of this process's part of the checkpoint is
        # written; the marker waits for every process's part (their random states, shards).
        distributed.barrier()
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (checkpoint.is_dir() and state.is_world_process_zero):
            return
        # Trainer pickles its arguments (training_args.bin) for people to read, never to resume;
        # lmforge keeps no pickles: the same arguments as JSON instead.
        pickled = checkpoint / "training_args.bin"
        if pickled.is_file():
            (checkpoint / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")
            pickled.unlink()
        mark_complete(checkpoint, state.global_step, self.run, self._loss_sum(state.global_step))
        rotate(Path(args.output_dir), self.limit)

    def on_log(self, args, state, control, logs=None, **kw):
        # Runs before the metrics file and TensorBoard see the line (the first callbacks added).
        if logs and "train_loss" in logs and self.resumed and self.resumed.get("loss_sum") is not None:
            before, at = self.resumed["loss_sum"], self.resumed["step"]
            logs["train_loss"] = (before + logs["train_loss"] * (state.global_step - at)) / state.global_step

    def _loss_sum(self, step: int) -> float | None:
        if self.trainer is None:
            return None
        before = self.resumed["loss_sum"] if self.resumed else 0.0
        if before is None:
            return None
        return before + losses_so_far(self.trainer)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str, run: str | None = None) -> str | None:
    """`fresh`/`none` -> None; `auto` -> the latest complete checkpoint (or None), refused when its
    marker names a run other than `run`; a path -> that path, checked to be complete."""
    if resume in ("fresh", "none"):
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        if not found:
            return None
        marker = read_marker(found[-1])
        if run and marker.get("run") and marker["run"] != run:
            raise ValueError(_other_run(Path(output_dir), f"{found[-1].name} of another run"))
        _same_world(found[-1], marker)
        return str(found[-1])
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume: checkpoint {path} does not exist")
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"train.resume: {path} is not a complete checkpoint (no {COMPLETE_MARKER}: the run was "
            "interrupted while saving it); use train.resume=auto to take the latest complete one"
        )
    _same_world(path, read_marker(path))
    return str(path)


def _same_world(checkpoint: Path, marker: dict) -> None:
    """Refuse resuming with another number of processes than wrote the checkpoint."""
    wrote, now = marker.get("world_size", 1), distributed.world_size()
    if wrote != now:
        raise ValueError(
            f"{checkpoint} was written by {wrote} process(es) and this run has {now}: each process "
            f"resumes its own place in the data, so resume with {wrote} (e.g. --nproc {wrote}), or "
            "start over with train.resume=fresh"
        )


def start_run(config: RunConfig) -> str | None:
    """Where this run starts, decided before anything is written to train.output_dir: the complete
    checkpoint `train_and_save` will resume from, or None. Starting over (`fresh`/`none`, or `auto`
    with nothing to resume) removes what an earlier start left (`RUN_FILES`, checkpoints), so
    metrics.jsonl and loss.png show one run; resuming trims metrics.jsonl to the checkpoint's step.
    A folder holding another run (its run.json) is refused unless the run starts over."""
    output_dir, resume, this = Path(config.train.output_dir), config.train.resume, run_id(config)
    writer = distributed.is_main()  # one process changes files (machines may share the folder)
    if resume == "auto" and _holds_results(output_dir):
        recorded = _recorded(output_dir)
        if recorded is not None and recorded.get("run") != this:
            raise ValueError(_other_run(output_dir, "another run", recorded.get("config"), tracked(config)))
    checkpoint = resolve_resume(output_dir, resume, this)
    if writer:
        if checkpoint is None:
            _clear(output_dir)
        else:
            _trim_metrics(output_dir / "metrics.jsonl", read_marker(Path(checkpoint)).get("step"))
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / RUN_FILE, json.dumps({"run": this, "config": tracked(config)}))
    return checkpoint


def _holds_results(output_dir: Path) -> bool:
    """Whether a run left anything worth keeping: a complete checkpoint or a saved result
    (`RESULTS`). A start that failed before its first checkpoint (bad data, say) left nothing."""
    return bool(complete_checkpoints(output_dir)) or any((output_dir / r).exists() for r in RESULTS)


def _recorded(output_dir: Path) -> dict | None:
    try:
        return json.loads((output_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _other_run(output_dir: Path, what: str, theirs: dict | None = None, ours: dict | None = None) -> str:
    differing = _differences(theirs, ours) if theirs and ours else []
    why = f" (its config differs in {', '.join(differing[:6])})" if differing else ""
    return (
        f"train.output_dir {output_dir} holds {what}{why}; to continue it, rerun with its own config; "
        "to start over there, pass --fresh (train.resume=fresh), which removes its checkpoints and "
        "metrics; or set train.output_dir to another folder"
    )


def _differences(theirs: dict, ours: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _clear(output_dir: Path) -> None:
    if not output_dir.is_dir():
        return
    for child in output_dir.iterdir():
        if CHECKPOINT.match(child.name) or child.name in RUN_FILES:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _trim_metrics(path: Path, step: int | None) -> None:
    """Drop the lines a killed run logged after the checkpoint it resumes from."""
    if step is None or not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    # A finished run's closing line (train_loss) is at its last step: the rerun writes its own.
    kept = [
        json.dumps(r)
        for r in rows
        if r.get("step", 0) < step or (r.get("step") == step and "train_loss" not in r)
    ]
    if len(kept) != len(rows):
        write_atomic(path, "".join(line + "\n" for line in kept))


def save_loop_checkpoint(
    output_dir: Path,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    limit: int,
    run: str | None = None,
) -> Path:
    """checkpoint-`step`/ of a loop lmforge runs itself (PPO's): each of `weights` as NAME.safetensors,
    optimizer and scheduler states, torch's and Python's RNGs and the loop's JSON `state`; written
    in a temporary folder, renamed, then marked complete. Keeps the newest `limit` (0: all).

    On several processes (every one calls this) the main process writes all of that, each other
    process adds its own torch RNG state (`rng_RANK.pt`), and only then is it marked complete."""
    final = Path(output_dir) / f"checkpoint-{step}"
    rng = f"rng_{distributed.rank()}.pt"
    if distributed.is_main():
        with atomic_folder(final) as folder:
            for name, tensors in weights.items():
                save_file(tensors, str(folder / f"{name}.safetensors"))
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(scheduler.state_dict(), folder / "scheduler.pt")
            torch.save(torch.get_rng_state(), folder / rng)
            (folder / "loop.json").write_text(
                json.dumps({**state, "python_rng": random.getstate()}), encoding="utf-8"
            )
    distributed.barrier()
    if not distributed.is_main():
        torch.save(torch.get_rng_state(), final / rng)
    distributed.barrier()
    if distributed.is_main():
        mark_complete(final, step, run)
        rotate(Path(output_dir), limit)
    return final


def load_loop_checkpoint(
    checkpoint: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, scheduler
) -> dict:
    """Restore what `save_loop_checkpoint` wrote into `modules` (by name), the optimizer, the
    scheduler and the RNGs; returns the loop's state."""
    for name, module in modules.items():
        params = dict(module.named_parameters())
        for key, value in load_file(str(checkpoint / f"{name}.safetensors")).items():
            params[key].data.copy_(value)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(checkpoint / f"rng_{distributed.rank()}.pt", weights_only=True))
    state = json.loads((checkpoint / "loop.json").read_text(encoding="utf-8"))
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state
