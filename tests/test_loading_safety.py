"""Loading is safe: no pickle-based loading of untrusted files and no remote code, anywhere in the packages.

- every ``torch.load`` call passes ``weights_only=True`` (tensors only, no arbitrary objects);
- ``trust_remote_code`` appears nowhere (no model repository may run its own code);
- no ``pickle.load(s)`` and no ``numpy.load(..., allow_pickle=True)``;
- checkpoints the trainer writes are safetensors and JSON only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agents", "diffusion_env", "rewards", "benchmarks")


def unsafe_loading(source: str, filename: str = "<source>") -> list[str]:
    """Findings (``file:line: what``) for unsafe loading in one Python source."""
    found = []
    if "trust_remote_code" in source:
        line = source[: source.index("trust_remote_code")].count("\n") + 1
        found.append(f"{filename}:{line}: trust_remote_code")
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load") or name == "load" and "weights_only" in kwargs:
            value = kwargs.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{filename}:{node.lineno}: {name}(...) without weights_only=True")
        elif name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load"):
            found.append(f"{filename}:{node.lineno}: {name}")
        elif name.endswith("np.load") or name.endswith("numpy.load"):
            value = kwargs.get("allow_pickle")
            if isinstance(value, ast.Constant) and value.value is True or value is not None and not isinstance(value, ast.Constant):
                found.append(f"{filename}:{node.lineno}: {name}(allow_pickle=...)")
    return found


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_package_sources_load_safely():
    files = list(_sources())
    assert len(files) > 20  # the packages were really found
    findings = [f for path in files for f in unsafe_loading(path.read_text(), str(path.relative_to(ROOT)))]
    assert not findings, "\n".join(findings)


@pytest.mark.parametrize(
    "snippet, bad",
    [
        ("import torch\nsd = torch.load(p)", True),
        ("import torch\nsd = torch.load(p, map_location='cpu', weights_only=False)", True),
        ("import torch\nsd = torch.load(p, weights_only=flag)", True),
        ("import torch\nsd = torch.load(p, map_location='cpu', weights_only=True)", False),
        ("m = AutoModel.from_pretrained(name, trust_remote_code=True)", True),
        ("import pickle\nx = pickle.loads(data)", True),
        ("import numpy as np\nx = np.load(p, allow_pickle=True)", True),
        ("import numpy as np\nx = np.load(p)", False),
        ("from safetensors.torch import load_file\nx = load_file(p)", False),
    ],
)
def test_the_checker_catches_unsafe_loading(snippet, bad):
    assert bool(unsafe_loading(snippet)) is bad


def test_trainer_checkpoints_are_safetensors_and_json(tiny_sd, tmp_path):
    from agents.config import TrainConfig
    from agents.trainer import Trainer

    cfg = TrainConfig(env_id="Denoise-SD14-Incompressibility-v0", num_epochs=1, samples_per_epoch=2, sample_batch_size=2,
                      train_batch_size=2, num_steps=2, env_kwargs=dict(model=str(tiny_sd), height=16, width=16,
                      prompts=["a cat"]), run_dir=str(tmp_path / "run"), progress=False, per_prompt_min_count=1,
                      per_prompt_buffer_size=4)  # fmt: skip
    tr = Trainer(cfg)
    tr.train_epoch()
    folder = tr.ckpt_dir / (tr.ckpt_dir / "latest").read_text()
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["optimizer.safetensors", "state.json", "weights.safetensors"]
    for name in ("optimizer.safetensors", "weights.safetensors"):
        header_len = int.from_bytes((folder / name).read_bytes()[:8], "little")
        assert (folder / name).read_bytes()[8 : 8 + header_len].startswith(b"{")  # safetensors: JSON header
