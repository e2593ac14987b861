"""auto's builder: makes a candidate through the pass runner (calibration ranges measured once
per model, method and scheme), scores it against the fp32 reference, and caches the model and
its numbers by content hash so that a re-run is fast."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import onnx

import passes as passes_package
from converter.check.bench import bench
from converter.check.validate import SCORING_RULE, semantics_figures, validate
from converter.check.validate_kernels import ReferenceCache
from converter.core.data import Dataset
from converter.core.errors import InternalError, OnnxshipError
from converter.core.machine import sha256_data, sha256_file, versions
from converter.core.onnxio import atomic_write_text, save_model
from converter.search.budget import Budget
from converter.search.candidates import Candidate, failure_reason
from converter.search.subset import ScoreParts, combine, proven_miss
from passes import PassRunner, fingerprint
from passes.base import quiet_passes
from passes.int8_share import int8_share
from passes.normalize import opset_of
from passes.quantize import StaticQuantize, default_calib_method
from passes.registry import make_recipe_pass

__all__ = ["Builder"]

logger = logging.getLogger(__name__)

_CACHED = ("score", "cosine", "worst")  # the numbers a cache entry holds
# (an entry of a candidate decided on the subset holds them under "subset" instead, with
# the counts: an entry of a whole-set score never reads as a subset's, nor the reverse)
_RECORDS = ("semantics", "int8_macs")  # and its records (None or a dict)
PROBE_RUNS = 20  # runs per model of Builder.speeds' quick probe


class Builder:
    """Builds candidates through the pass runner, reusing calibration ranges per model and
    method, and caching each result by content hash in ``cache``."""

    def __init__(
        self,
        model: onnx.ModelProto,
        calib: Path,
        score: Path,
        reference: Path,
        budget: Budget,
        cache: Path,
        target: str,
        parts: ScoreParts | None = None,
    ) -> None:
        """``parts``: the scoring set cut for the subset-first scoring
        (converter.search.subset); None scores every candidate on the whole set at once."""
        self.model = model
        self.parts = parts
        self.calib, self.score, self.reference = calib, score, reference
        self.budget = budget
        self.cache = cache
        self.target = target
        self.ranges: dict[tuple[Any, ...], Any] = {}
        self.reference_score = 0.0
        self.threshold = 0.0
        self.references = ReferenceCache()  # fp32 outputs for the semantics figure, once
        # one scoring sample's shape per input: MACs are counted at the data's size
        self.sample_shapes = Dataset(score).sample_shapes()
        # Everything that feeds a cached number, besides each candidate's own passes.
        self.context = {
            "model": fingerprint(model),
            "calibration": sha256_data(calib),
            "scoring": sha256_data(score),
            "metric": budget.metric,
            "score_batch": SCORING_RULE,  # the batch scores are measured at
            "record": 2,  # entries hold the semantics figure and the int8 share
            "target": target,
            "versions": {k: v for k, v in versions(False).items() if k != "numpy"},
            # a default that changes within a version (a lever switched on) changes the key
            "passes": passes_code(),
        }

    def key(self, passes: list[dict[str, Any]]) -> str:
        text = json.dumps([self.context, passes], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def evaluate(self, candidate: Candidate) -> Candidate:
        if self.read_cache(candidate):
            return candidate
        path = self.cache / f"{candidate.key}.onnx"
        try:
            with quiet_passes():
                save_model(self.build(candidate.passes), path)
            candidate.path = path
            self._score(candidate)
        except (OSError, MemoryError):  # the environment: every later candidate would fail too
            raise
        except Exception as e:  # this candidate failed; the search goes on (failure_reason)
            path.unlink(missing_ok=True)  # no record: never read back as a cache entry
            return _failed(candidate, e)
        self._write_entry(candidate, sha256_file(path))
        return self._judge(candidate)

    def _write_entry(self, c: Candidate, sha256: str) -> None:
        """``c``'s cache entry: its numbers (a subset's under ``subset``) and records."""
        numbers = {"subset": c.subset} if c.subset else {k: getattr(c, k) for k in _CACHED}
        numbers.update({k: getattr(c, k) for k in _RECORDS}, scored_at=c.scored_at)
        path = self.cache / f"{c.key}.json"
        atomic_write_text(path, json.dumps({**numbers, "sha256": sha256}))

    def read_cache(self, candidate: Candidate) -> bool:
        """Fill in ``candidate`` from the cache, judged; False when it is not there."""
        candidate.key = self.key(candidate.passes)
        path = self.cache / f"{candidate.key}.onnx"
        numbers = _cached(path, path.with_suffix(".json"))
        if numbers is None or (numbers.get("subset") and not self._same_parts(numbers["subset"])):
            return False  # (a subset of another size: built and scored again)
        candidate.__dict__.update(numbers, path=path, cached=True)
        if candidate.subset and not self._proven(candidate.subset):
            self.complete(candidate)  # (decided under another budget: this one needs more)
        self._judge(candidate)
        return True

    def _same_parts(self, subset: dict[str, Any]) -> bool:
        """Whether numbers measured on a subset were measured on this run's."""
        parts = self.parts
        return parts is not None and (subset["samples"], subset["of"]) == (
            parts.samples,
            parts.total,
        )

    def complete(self, c: Candidate) -> Candidate:
        """``c`` scored on the whole set, if it was decided on the subset: the other
        samples scored, the two parts combined (converter.search.subset.combine), the cache
        entry updated. What a decision that reads the score of a candidate missing the
        budget calls first."""
        if not c.subset or c.path is None or c.error:
            return c
        if not self._same_parts(c.subset):
            raise InternalError(f"{c.name} was scored on a subset this run does not have")
        rest, scored_at, _ = self._validate(c.path, self.parts.rest)
        if scored_at["batch_size"] != c.scored_at["batch_size"]:
            raise InternalError(f"{c.name}: its two parts were scored at different batches")
        c.__dict__.update(combine(self.parts, c.subset, rest), subset=None)
        c.scored_at = {**scored_at, "samples": self.parts.total}
        if Path(c.path).with_suffix(".json").exists():
            self._write_entry(c, sha256_file(c.path))
        return self._judge(c)

    def _proven(self, subset: dict[str, Any]) -> str:
        """Why numbers measured on the subset miss this run's budget ("" if they may meet)."""
        if not self._same_parts(subset):
            return ""
        budget = self.budget
        return proven_miss(
            self.parts, budget.metric, self.threshold, budget.min_worst, subset["score"],
            subset["worst"],
        )  # fmt: skip

    def speeds(self, candidates: list[Candidate], runs: int = PROBE_RUNS) -> dict[str, float]:
        """A quick speed probe of built candidates: each one's speedup over fp32 at batch 1,
        one thread, interleaved in this process, from the fastest of ``runs`` runs (the
        minimum: on a shared CPU the median moves with the neighbours' load, the minimum
        far less). For choosing between candidates before the finalists' bench, never
        reported as a candidate's speed."""
        built = [c for c in candidates if c.path is not None and not c.error]
        if not built:
            return {}
        report = bench(
            [self.reference, *(c.path for c in built)], threads=[1], warmup=3, runs=runs,
            data=self.score, warn_target=False,
        )  # fmt: skip
        fastest = [report.get(i, 1).latency.min_ms for i in range(len(built) + 1)]
        return {c.name: fastest[0] / t for c, t in zip(built, fastest[1:])}

    def _judge(self, c: Candidate) -> Candidate:
        """Whether ``c`` meets this run's budget (cached numbers may come from another); one
        decided on the subset misses it."""
        if c.subset:
            c.meets = False
            return c
        gates = self.budget.candidate_gates(self.reference_score, c.score, c.worst)
        c.meets = all(g.passed for g in gates)
        return c

    def build(self, passes: list[dict[str, Any]]) -> onnx.ModelProto:
        """The model ``passes`` make of the fp32 model (prune and smooth rewrite it first)."""
        model = self.model
        built = []
        for entry in passes:
            settings = {k: v for k, v in entry.items() if k != "pass"}
            if entry["pass"] == "quantize-static":
                settings = {
                    **settings,
                    "progress": False,
                    "ranges": self._ranges_of(model, settings),
                }
                # GPTQ, bias correction and stem rounding read the samples again (the last
                # two are on by default with data: unless both are off, they get it)
                reads = settings.get("weight_rounding") == "gptq"
                later = ("bias_correction", "stem_rounding")
                if reads or any(settings.get(k) is not False for k in later):
                    settings["calibration"] = self.calib
            if entry["pass"] in ("prune", "smooth"):  # later passes see the rewritten model
                rewrite = make_recipe_pass(entry["pass"], settings, self.calib)
                model, _ = PassRunner([rewrite]).run(model)
                continue
            built.append(make_recipe_pass(entry["pass"], settings))
        return PassRunner(built).run(model)[0]

    def static_ranges(self, config: dict[str, Any]) -> Any:
        """The ranges a static ``config`` (no prune/smooth pass before it) is quantized
        with: measured once per method and scheme, shared by its candidates and by the
        sensitivity ranking of its fallback (which would otherwise calibrate again: 30+ s
        with mse ranges on MobileNetV2)."""
        return self._ranges_of(self.model, {k: v for k, v in config.items() if k != "pass"})

    def _ranges_of(self, model: onnx.ModelProto, settings: dict[str, Any]) -> Any:
        """The ranges static ``settings`` quantize ``model`` with (which carry the model
        they were measured on: equalized or not, as the settings say; None: the pass's
        default)."""
        method, scheme, equalize = _calib_of(settings), settings["scheme"], settings.get("equalize")
        given = {} if equalize is None else {"equalize": equalize}
        calibrator = StaticQuantize(
            calibration=self.calib,
            calib_method=method,
            progress=False,
            target=self.target,
            scheme=scheme,
            per_channel=settings.get("per_channel", True),
            **given,
        )
        # the opset the pass quantizes at: per-channel Q/DQ upgrades an opset-11 model to 13,
        # per-tensor does not, and ranges are measured on the model as the pass takes it
        opset = max(opset_of(model), calibrator.min_opset(model).opset)
        key = (fingerprint(model), method, scheme, equalize, opset)
        if key not in self.ranges:
            # another method's ranges on the same model: its pre-processed (and equalized)
            # model is the same; made once (equalizing alone: 5+ s on MobileNetV2)
            sibling = next(
                (r for k, r in self.ranges.items() if k[0] == key[0] and k[2:] == key[2:]), None
            )
            self.ranges[key] = calibrator.calibrate(model, prepared_as=sibling)
        return self.ranges[key]

    def measure_semantics(self, c: Candidate) -> None:
        """``c``'s QDQ semantics figure (optimizations off) beside its kernel score, if not
        measured yet: auto measures it for the finalists and for the fallback steps it
        rejects (what the report explains), not for every candidate — it costs several
        times the kernel scoring, and no decision reads it. The cache entry is updated."""
        if c.path is None or c.error or c.semantics is not None:
            return
        figures = semantics_figures(  # (the kernel score over the whole set is known)
            c.path,
            self.score,
            reference=self.reference,
            metrics=self._metrics(),
            references=self.references,
            warn_target=False,  # auto warned once
        )
        # {}: measured, and not a QDQ model (nothing runs differently with optimizations off)
        c.semantics = {} if figures is None else figures.compact()
        record = Path(c.path).with_suffix(".json")
        try:
            entry = json.loads(record.read_text())
        except (OSError, ValueError):  # no entry to update: the figure stays in this run
            return
        atomic_write_text(record, json.dumps({**entry, "semantics": c.semantics}))

    def _metrics(self) -> list[str]:
        """What a candidate is scored on: the budget's metric, and cosine (mean and worst)."""
        return list(dict.fromkeys([self.budget.metric, "cosine"]))

    def _score(self, c: Candidate) -> None:
        """The kernel score (what ships, what the search decides on) and the int8 share;
        the semantics figure is left to measure_semantics. With ``parts``, on the subset
        first: a candidate the subset proves a miss keeps its subset numbers (``c.subset``;
        ``complete`` scores the rest when a decision needs its score), any other one is
        scored on the rest too, the parts combined. (A fallback step too, though its score
        is read at once: scoring every candidate with the same batch shapes keeps the peak
        memory down — onnxruntime keeps memory per shape after a session is dropped:
        MobileNetV2 auto 1.68 GiB peak RSS this way, 2.24 GiB with the steps scored whole.)"""
        parts = self.parts
        data = self.score if parts is None else parts.first
        numbers, c.scored_at, share = self._validate(c.path, data)
        if parts is not None:
            why = proven_miss(
                parts, self.budget.metric, self.threshold, self.budget.min_worst,
                numbers["score"], numbers["worst"],
            )  # fmt: skip
            if why:
                c.subset = {**numbers, "samples": parts.samples, "of": parts.total, "miss": why}
            else:
                rest, scored_at, _ = self._validate(c.path, parts.rest)
                numbers = combine(parts, numbers, rest)
                c.scored_at = {**scored_at, "samples": parts.total}
        if not c.subset:
            c.score, c.cosine, c.worst = numbers["score"], numbers["cosine"], numbers["worst"]
        share = share or int8_share(onnx.load(str(c.path), load_external_data=False))
        c.int8_macs = share.to_dict()

    def _validate(self, path: Path, data: Path) -> tuple[dict[str, float], dict[str, Any], Any]:
        """The kernel score, mean and worst cosine of the model at ``path`` on ``data``, how
        they were measured (ValidationReport.scoring) and the int8 share validate counted."""
        report = validate(
            path,
            data,
            reference=self.reference,
            metrics=self._metrics(),
            progress=False,
            kernel_samples=0,
            warn_target=False,  # auto warned once
        )
        values = report.outputs[report.output]
        numbers = {
            "score": values[self.budget.metric].value,
            "cosine": values["cosine"].value,
            "worst": values["cosine"].worst,
        }
        return numbers, report.scoring(), report.int8_macs


@functools.cache
def passes_code() -> str:
    """A digest of the passes package's source: what builds a candidate besides its
    settings. Cached candidates of other code are built again."""
    digest = hashlib.sha256()
    for path in sorted(Path(passes_package.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _failed(candidate: Candidate, e: Exception) -> Candidate:
    """``candidate`` marked as failed with its one-line reason (the report's row); an
    internal error is a warning (with the traceback under --debug)."""
    candidate.error = failure_reason(e)
    candidate.path, candidate.score, candidate.cosine, candidate.worst = None, None, None, None
    if isinstance(e, OnnxshipError) and not isinstance(e, InternalError):
        logger.info("  %s: failed (%s)", candidate.name, candidate.error)
    else:
        logger.warning("warning: candidate %s failed: %s", candidate.name, candidate.error)
        logger.debug("candidate %s", candidate.name, exc_info=e)
    return candidate


def _calib_of(settings: dict[str, Any]) -> str:
    """The calibration method a static config uses (its scheme's default when unset)."""
    return settings.get("calib_method") or default_calib_method(settings["scheme"])


def _cached(path: Path, record: Path) -> dict[str, Any] | None:
    """A cache entry's numbers, or None when absent; a corrupt or truncated entry (record
    unreadable, numbers missing, model bytes not those recorded) is dropped with a warning
    and recomputed."""
    if not (path.exists() and record.exists()):
        return None
    try:
        entry = json.loads(record.read_text())
        if "subset" in entry:  # decided on the subset: its numbers are the subset's
            subset = entry["subset"]
            counts = {k: int(subset[k]) for k in ("samples", "of")}
            subset = {**subset, **counts, **{k: float(subset[k]) for k in _CACHED}}
            numbers = {k: None for k in _CACHED} | {"subset": subset}
        else:
            numbers = {k: float(entry[k]) for k in _CACHED}
        numbers["scored_at"] = entry.get("scored_at")
        numbers.update({k: entry[k] for k in _RECORDS})
        if sha256_file(path) != entry["sha256"]:
            raise ValueError("the model file is not the one its numbers were measured on")
    except (ValueError, KeyError, TypeError, OSError) as e:
        logger.warning("warning: cache entry %s is corrupt (%s); recomputing it", record, e)
        return None
    return numbers
