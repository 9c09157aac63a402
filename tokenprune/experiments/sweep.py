"""Ablation sweeps: ``tokenprune sweep CONFIG`` (YAML or TOML).

A config names a model, a dataset, a base pipeline and a grid; every grid point is one
``Pipeline.from_dict`` of the base with the grid's values applied — no special cases::

    name: hired-alpha
    model: builtin                 # the built-in tiny LLaVA-NeXT, or a local checkpoint folder
    dataset: sample                # built-in set, a .jsonl file, a save_to_disk folder, or
                                   # {kind: jsonl, path: ..., limit: 100}
    output: runs/hired-alpha       # results.rank*.jsonl, results.jsonl, summary.md/.csv, plots
    generation: {max_new_tokens: 8}
    prompt: "{question} Answer the question using a single word or phrase."
    base:
      adapter: llava_next
      allocator: hired
      selector: cls_final
      budget: 0.2
    grid:                          # or a list of grids: their points are concatenated
      allocator.alpha: [0.0, 0.25, 0.5, 0.75, 1.0]
      budget: [0.1, 0.2]

Grid keys: ``adapter`` / ``allocator`` / ``selector`` (a name, preset name or config dict:
replaces that part, options included), ``budget``, ``<part>.<option>`` (sets one
option, after any part replacement) and a bare option name (routed to the one part that
takes it): the grammar of :func:`tokenprune.overrides.apply_overrides`. Every grid point
is validated before the first sample runs.

Everything is checked before the model loads: the grid, the prompt (``{question}`` is its
only field), ``generation`` (names and values), ``seed``, ``device``, ``dtype``, the output
folder, and that a pipeline needing prompt relevance names a scorer.

Results are one append-only JSONL row per (grid point, sample), flushed and fsynced: a
restart skips what is done and re-attempts failed rows (``--skip-failed`` keeps them); a
killed run restarted ends with every row exactly once. One sweep writes a folder at a time
(a lock; a second one is refused). A folder holds one set of run settings (model, prompt,
generation, dtype, dataset, metrics, seed); another config into it is refused unless
``--mix-settings``, and then every row and summary label carries its settings. Under
``accelerate launch --multi_gpu --num_processes N -m tokenprune sweep CONFIG`` each rank
takes every N-th sample and writes its own shard; rank 0 merges and summarises when all are
done. Ranks wait at most ``rendezvous_timeout`` seconds (default 300) for each other at start.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cost import LLMShape, prefill_flops
from ..errors import ConfigError, TokenpruneError
from ..overrides import apply_overrides
from ..pipeline import Pipeline
from ..runtime import BUILTIN_MODEL, chat_prompt, default_device, load_model, parse_dtype, rank_from_env
from .datasets import SHORT_ANSWER_PROMPT, Sample, load_samples, shard
from .metrics import METRICS, score_all
from .progress import progress
from .results import ResultRow, ResultsStore, grid_point_id, merge
from .summary import flatten_settings, summarize, to_markdown, write_report
from .validate import (
    check_device,
    check_generation,
    check_output_folder,
    check_positive_int,
    check_prompt,
    check_relevance_scorer,
    read_config_file,
)

__all__ = [
    "GridPoint",
    "RendezvousError",
    "SweepConfig",
    "SweepReport",
    "grid_points",
    "load_config",
    "run_sweep",
]

_PARTS = ("adapter", "allocator", "selector")
_TOP_KEYS = {
    "name", "model", "dataset", "output", "generation", "prompt", "metrics", "base", "grid", "device", "dtype",
    "seed", "rendezvous_timeout",
}  # fmt: skip


class RendezvousError(TokenpruneError, RuntimeError):
    """The processes of a multi-process sweep could not find each other."""


@dataclass(frozen=True)
class GridPoint:
    """One pipeline configuration of a sweep."""

    index: int
    config: dict[str, Any]
    overrides: dict[str, Any]

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items()) or "base"


@dataclass(frozen=True)
class SweepConfig:
    """A parsed sweep config (see the module docs)."""

    name: str
    model: str
    dataset: Any
    output: Path
    base: dict[str, Any]
    grid: list[dict[str, list[Any]]]
    generation: dict[str, Any]
    prompt: str
    metrics: tuple[str, ...]
    device: str | None
    dtype: str
    seed: int
    rendezvous_timeout: float = 300.0


def load_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> SweepConfig:
    """Parse and check a sweep config (a file path or an already-loaded mapping)."""
    if isinstance(source, Mapping):
        data, origin, folder = dict(source), "sweep config", Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"sweep config {path} does not exist")
        data, origin, folder = read_config_file(path), str(path), path.parent
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{origin}: unknown keys {unknown}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("base", "grid"):
        if key not in data:
            raise ConfigError(f"{origin}: missing '{key}'")
    base = data["base"]
    if not isinstance(base, Mapping):
        raise ConfigError(f"{origin}: 'base' must be a pipeline config mapping")
    grids = data["grid"] if isinstance(data["grid"], list) else [data["grid"]]
    checked: list[dict[str, list[Any]]] = []
    for grid in grids:
        if not isinstance(grid, Mapping):
            raise ConfigError(f"{origin}: 'grid' must be a mapping (or a list of mappings) of key: [values]")
        entry = {}
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{origin}: grid key {key!r} needs a non-empty list of values, got {values!r}")
            part = key.split(".", 1)[0]
            if "." in key and part not in _PARTS:
                raise ConfigError(
                    f"{origin}: grid key {key!r} must be 'budget', a part ({', '.join(_PARTS)}), "
                    "'<part>.<option>' or an option name"
                )
            entry[str(key)] = list(values)
        checked.append(entry)
    output = Path(data.get("output", f"runs/{data.get('name', 'sweep')}"))
    if not output.is_absolute() and not isinstance(source, Mapping):
        output = (folder / output).resolve()
    metrics = data.get("metrics", ())
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    for metric in metrics:
        if metric not in METRICS:
            raise ConfigError(f"{origin}: unknown metric {metric!r}; available: {', '.join(sorted(METRICS))}")
    dataset = data.get("dataset", "sample")
    if isinstance(dataset, str) and dataset not in ("sample", "builtin") and not Path(dataset).is_absolute():
        dataset = str(folder / dataset)
    elif isinstance(dataset, Mapping) and isinstance(dataset.get("path"), str) and not Path(dataset["path"]).is_absolute():
        dataset = {**dataset, "path": str(folder / dataset["path"])}
    model = str(data.get("model", "builtin"))
    if model != "builtin" and not Path(model).is_absolute():
        candidate = folder / model
        model = str(candidate) if candidate.exists() else model
    if model != "builtin" and not (Path(model) / "config.json").is_file():
        raise ConfigError(f"{origin}: model {model}: no config.json there; give a local checkpoint folder or 'builtin'")
    dtype = data.get("dtype", "auto")
    try:
        parse_dtype(dtype)
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from None
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{origin}: seed must be an int, got {seed!r}")
    timeout = data.get("rendezvous_timeout", 300.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"{origin}: rendezvous_timeout must be a number of seconds > 0, got {timeout!r}")
    try:
        return SweepConfig(
            name=str(data.get("name", "sweep")),
            model=model,
            dataset=dataset,
            output=check_output_folder(output),
            base=dict(base),
            grid=checked,
            generation=check_generation(data.get("generation", {})),
            prompt=check_prompt(data.get("prompt", "{question} " + SHORT_ANSWER_PROMPT)),
            metrics=metrics,
            device=check_device(data.get("device")),
            dtype=dtype,
            seed=seed,
            rendezvous_timeout=float(timeout),
        )
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from None


def _apply(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    return apply_overrides(base, overrides)  # the one override grammar, shared with Pipeline and lmms-eval


def grid_points(config: SweepConfig) -> list[GridPoint]:
    """Every grid point, validated (built once) before anything runs."""
    points: list[GridPoint] = []
    seen: set[str] = set()
    for grid in config.grid:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            overrides = dict(zip(keys, values))
            try:
                pipeline = Pipeline.from_dict(_apply(config.base, overrides))
                check_relevance_scorer(pipeline, "the base pipeline" if not overrides else "this grid point")
            except TokenpruneError as error:
                raise ConfigError(f"grid point {overrides}: {error}") from error
            canonical = pipeline.to_dict()
            key = json.dumps(canonical, sort_keys=True, default=str)
            if key in seen:
                continue  # the same pipeline reached from two grids runs once
            seen.add(key)
            points.append(GridPoint(len(points), canonical, overrides))
    return points


@dataclass(frozen=True)
class SweepReport:
    """What a sweep run did."""

    output: Path
    grid_points: int
    samples: int
    ran: int
    skipped: int
    failed: int
    rank: int
    world_size: int
    written: dict[str, Path]


class _FirstTokenClock:
    """A generate() streamer that timestamps the prompt and the first new token."""

    def __init__(self) -> None:
        self.prompt_at: float | None = None
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        _sync()  # the current device (set to the model's GPU by the runner)
        now = time.perf_counter()
        if self.prompt_at is None:
            self.prompt_at = now
        elif self.first_token_at is None:
            self.first_token_at = now

    def end(self) -> None:
        return None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Ranks:
    """This process's rank among the launcher's processes, and a barrier across them."""

    def __init__(self, rendezvous_timeout: float = 300.0) -> None:
        environ = os.environ
        self.rank, self.world_size = rank_from_env(environ)
        if self.world_size == 1:
            if environ.get("MASTER_ADDR") and str(environ.get("ACCELERATE_USE_CPU", "")).lower() == "true":
                raise ConfigError(
                    "accelerate launch --cpu with --num_processes > 1 starts a single process (accelerate's "
                    "multi-CPU mode needs mpirun), so the sweep would not be sharded. On CPU use "
                    "'accelerate launch --multi_gpu --num_processes N -m tokenprune sweep CONFIG' (torchrun "
                    "processes, gloo), or pass --num_processes 1"
                )
        self._group = False
        self._final: Any = None
        if self.world_size > 1:
            self._join(rendezvous_timeout)

    def _join(self, timeout_s: float) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            return
        from datetime import timedelta

        where = f"rank {self.rank} of {self.world_size}"
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise RendezvousError(
                f"{where} (from the environment) but {' and '.join(missing)} not set: start the ranks with "
                "'accelerate launch --multi_gpu' or torchrun (they set it), or unset RANK/WORLD_SIZE for one process"
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(torch.device(default_device(os.environ)))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(
                backend, rank=self.rank, world_size=self.world_size, timeout=timedelta(seconds=timeout_s)
            )
        except (RuntimeError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RendezvousError(
                f"{where}: the other ranks did not join at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                f"within {timeout_s:g} s ({first}); start every rank, or raise rendezvous_timeout in the config"
            ) from None
        self._group = True
        # ranks may finish hours apart (a resumed shard is already done): the final barrier waits long
        self._final = dist.new_group(timeout=timedelta(days=2))

    def device(self) -> str:
        return default_device() if self.world_size > 1 else default_device({})

    def barrier(self, *, final: bool = False) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self._final if final else None)

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False


def _load(config: SweepConfig, device: str) -> tuple[Any, Any, str, str]:
    dtype = parse_dtype(config.dtype)
    model, processor, adapter = load_model(config.model, device=device, dtype=dtype, seed=config.seed)
    return model, processor, adapter, _model_id(config)


def _evaluate(
    pipeline: Pipeline, model: Any, processor: Any, sample: Sample, config: SweepConfig, llm: LLMShape | None
) -> dict[str, Any]:
    text = chat_prompt(processor, config.prompt.format(question=sample.question))
    image = sample.load_image()
    generation = {"max_new_tokens": 16, "do_sample": False, **config.generation}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _sync()
    start = time.perf_counter()
    with torch.inference_mode():
        inputs = pipeline.prepare(model, processor, images=image, text=text, question=sample.question)
        prepared = time.perf_counter()
        clock = _FirstTokenClock()
        # generate() refuses streamers with beam search: no first-token time then
        streaming = int(generation.get("num_beams", 1)) == 1
        output = model.generate(**inputs, **({"streamer": clock} if streaming else {}), **generation)
    _sync()
    end = time.perf_counter()
    stats = pipeline.last_stats[0]
    new = output[0, inputs["input_ids"].shape[1] :]
    prediction = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    first = clock.first_token_at or end
    prefill = (prepared - start) + (first - (clock.prompt_at or prepared)) if streaming else None
    decode_time = end - first if streaming else 0.0
    metrics = [sample.metric] if sample.metric else list(config.metrics) or ["exact_match"]
    return {
        "prediction": prediction,
        "scores": score_all(metrics, prediction, sample.answers),
        "visual_tokens": stats.image_tokens,
        "full_visual_tokens": stats.stock_image_tokens,
        "tokens_per_partition": list(stats.kept),
        "partitions": list(stats.partitions),
        "prefill_s": prefill,
        "decode_tokens_per_s": (len(new) - 1) / decode_time if len(new) > 1 and decode_time > 0 else None,
        "new_tokens": int(len(new)),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
        "prefill_flops": prefill_flops(stats.prefill_length, llm) if llm and stats.prefill_length else None,
    }


def run_sweep(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    limit: int | None = None,
    show_progress: bool | None = None,
    plots: bool = True,
    retry_failed: bool = True,
    mix_settings: bool = False,
) -> SweepReport:
    """Run (or resume) a sweep; see the module docs. Returns what this rank did.

    Args:
        limit: only the first ``limit`` samples (an int >= 1).
        retry_failed: re-attempt rows that failed before (``False`` keeps them as they are).
        mix_settings: allow rows of other run settings in the output folder (each row and
            summary label then carries its settings); otherwise such a folder is refused.
    """
    if limit is not None:
        check_positive_int(limit, "limit")
    config = load_config(source)
    points = grid_points(config)
    ranks = _Ranks(config.rendezvous_timeout)
    try:
        return _run(
            config, points, ranks, limit=limit, show_progress=show_progress, plots=plots,
            retry_failed=retry_failed, mix_settings=mix_settings,
        )  # fmt: skip
    finally:
        ranks.close()


def _model_id(config: SweepConfig) -> str:
    return "builtin:tiny-llava-next" if config.model == BUILTIN_MODEL else str(Path(config.model).resolve())


def _run_settings(config: SweepConfig) -> dict[str, Any]:
    """Everything besides the pipeline and model that changes a row's outcome."""
    return {
        "prompt": config.prompt,
        "generation": config.generation,
        "dtype": config.dtype,
        "dataset": config.dataset if isinstance(config.dataset, (str, dict)) else str(config.dataset),
        "metrics": list(config.metrics),
        "seed": config.seed,
    }


def _claim_folder(config: SweepConfig, run: dict[str, Any], ranks: _Ranks, mix_settings: bool) -> None:
    """Refuse a folder that holds rows of other settings (unless mixing), then record ours."""
    manifest = config.output / "sweep.json"
    try:
        runs = json.loads(manifest.read_text(encoding="utf-8"))["runs"] if manifest.exists() else []
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{manifest} is damaged; move it away (it lists the settings of the folder's rows)") from None
    known = json.loads(json.dumps(run, default=str))
    if runs and known not in runs and not mix_settings:
        before, now = flatten_settings(runs[-1]), flatten_settings(known)
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        shown = "; ".join(f"{k}: {before.get(k, 'unset')} -> {now.get(k, 'unset')}" for k in changed[:4])
        raise ConfigError(
            f"{config.output} holds results of other settings ({shown}); use another output folder, or pass "
            "--mix-settings to add these rows beside them (labelled by their settings)"
        )
    ranks.barrier()  # every rank has read the manifest before rank 0 adds to it
    if ranks.rank == 0 and known not in runs:
        _write_json(manifest, {"runs": [*runs, known]})


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(temporary, path)


def _write_grid(config: SweepConfig, points: list[GridPoint], ids: list[str], settings: dict[str, Any]) -> None:
    """``grid.json``: every grid point the folder's rows come from, this run's added or updated."""
    path = config.output / "grid.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    except (OSError, ValueError):
        entries = []
    by_id = {e["grid_point"]: e for e in entries if isinstance(e, dict) and isinstance(e.get("grid_point"), str)}
    for point, grid_point in zip(points, ids):
        by_id[grid_point] = {
            "grid_point": grid_point, "index": point.index, "overrides": point.overrides, "config": point.config,
            "settings": settings,
        }  # fmt: skip
    _write_json(path, list(by_id.values()))


def _run(
    config: SweepConfig,
    points: list[GridPoint],
    ranks: _Ranks,
    *,
    limit: int | None,
    show_progress: bool | None,
    plots: bool,
    retry_failed: bool,
    mix_settings: bool,
) -> SweepReport:
    rank, world_size = ranks.rank, ranks.world_size
    model_id, settings = _model_id(config), _run_settings(config)
    with ResultsStore.for_rank(config.output, rank) as store:  # the lock: one sweep per folder
        _claim_folder(config, {"model": model_id, "settings": settings}, ranks, mix_settings)
        samples = load_samples(config.dataset)
        if limit is not None:
            samples = samples[:limit]
        mine = shard(samples, rank, world_size)
        # a row's key: (grid point id, sample id); the id covers the pipeline, model and settings
        # (the model decides a missing adapter, so the pipeline's own config suffices)
        keyed = [(grid_point_id({**point.config, "run": settings}, model_id), point) for point in points]
        if rank == 0:
            _write_grid(config, points, [grid_point for grid_point, _ in keyed], settings)
        work = [(grid_point, point, sample) for grid_point, point in keyed for sample in mine]
        pending = [
            item for item in work if not store.is_done(item[0], item[2].id, include_failed=not retry_failed)
        ]
        ran = failed = 0
        if pending:
            ran, failed = _compute(config, pending, len(work), store, ranks, model_id, settings, show_progress)
    written: dict[str, Path] = {}
    ranks.barrier(final=True)  # every shard is complete before rank 0 merges
    if rank == 0:
        merge(config.output)
        written = write_report(config.output / "results.jsonl", config.output, plots=plots)
        written["results"] = config.output / "results.jsonl"
    skipped = len(work) - len(pending)
    return SweepReport(config.output, len(points), len(samples), ran, skipped, failed, rank, world_size, written)


def _compute(
    config: SweepConfig,
    pending: list[tuple[str, GridPoint, Sample]],
    total: int,
    store: ResultsStore,
    ranks: _Ranks,
    model_id: str,
    settings: dict[str, Any],
    show_progress: bool | None,
) -> tuple[int, int]:
    """Load the model and compute the pending rows; returns (ran, failed)."""
    device = config.device or ranks.device()
    if ranks.world_size > 1 and device == "cuda":
        device = ranks.device()  # one GPU per rank, not all on cuda:0
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # timing sync and peak memory read this GPU
    torch.manual_seed(config.seed)
    model, processor, adapter, _ = _load(config, device)
    try:
        llm: LLMShape | None = LLMShape.from_config(model.config)
    except ConfigError:
        llm = None
    pipelines: dict[int, Pipeline] = {}
    for _, point, _ in pending:
        if point.index not in pipelines:
            spec = dict(point.config)
            if spec.get("adapter") is None:
                spec["adapter"] = {"name": adapter}
            pipelines[point.index] = Pipeline.from_dict(spec)
    # one untimed run first: lazy imports and first-call set-up must not count
    _, point, sample = pending[0]
    warm = SweepConfig(**{**config.__dict__, "generation": {**config.generation, "max_new_tokens": 1}})
    try:
        _evaluate(pipelines[point.index], model, processor, sample, warm, llm)
    except Exception:  # noqa: BLE001 - the real run records the error
        pass
    ran = failed = 0
    bar = progress(
        pending,
        total=total,
        initial=total - len(pending),  # rows done before count as done, not as work this run did
        description=f"{config.name} [rank {ranks.rank}]",
        force=show_progress,
        rank=ranks.rank,
    )
    for grid_point, point, sample in bar:
        pipe = pipelines[point.index]
        row = ResultRow(
            grid_point=grid_point,
            sample_id=sample.id,
            model=model_id,
            config=pipe.to_dict(),
            category=sample.category,
            question=sample.question,
            answers=list(sample.answers),
            rank=ranks.rank,
            settings=settings,
        ).to_dict()
        try:
            row.update(_evaluate(pipe, model, processor, sample, config, llm))
            ran += 1
        except Exception as error:  # noqa: BLE001 - any per-sample failure is that sample's row
            row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"
            failed += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row["finished_at"] = time.time()
        store.append(row)
    return ran, failed


def add_sweep_parser(sub: Any) -> None:
    from .._subcommand import add_command

    parser = add_command(sub, "sweep", "run (or resume) an ablation sweep from a YAML/TOML config", __doc__)
    parser.add_argument("config", help="sweep config (.yaml, .yml or .toml)")
    parser.add_argument("--limit", type=int, help="only the first N samples, N >= 1 (a quick look)")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    parser.add_argument(
        "--skip-failed", action="store_true", help="keep rows that failed before instead of re-attempting them"
    )
    parser.add_argument(
        "--mix-settings",
        action="store_true",
        help="add rows of other settings (prompt, generation, model, ...) to a folder that holds some; "
        "rows and labels then carry their settings",
    )
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always draw the progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never draw it")
    parser.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: Any) -> int:
    report = run_sweep(
        args.config,
        limit=args.limit,
        show_progress=args.progress,
        plots=not args.no_plots,
        retry_failed=not args.skip_failed,
        mix_settings=args.mix_settings,
    )
    who = f"rank {report.rank}/{report.world_size}: " if report.world_size > 1 else ""
    print(
        f"{who}{report.grid_points} grid points x {report.samples} samples: ran {report.ran}, "
        f"skipped {report.skipped} already done, {report.failed} failed"
    )
    if report.written:
        summaries = summarize(report.written["results"])
        print()
        print(to_markdown(summaries))
        for name, path in sorted(report.written.items()):
            print(f"wrote {name}: {path}")
    if report.failed and not report.ran:
        print(f"{who}every row this run computed failed; see the 'error' field of the rows", file=sys.stderr)
        return 1
    return 0
