"""A new adapter method is one folder plus one registration line.

The folder is the README's example (its architecture section's `# scale/...` blocks, so the
README and this test cannot drift apart): a learned per-feature scale g of linear outputs,
y' = g * y. It is written to a temporary directory, imported, and then goes the whole way:
validated at publish (torch-free), published, loaded by name onto a tiny Llama, activated
alone and in a `Sum`, and checked against an independent computation (a copy of the base
with each target layer's weight and bias rescaled).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deltahub import artifact as af
from deltahub.compose import AdaptedModel, Sum
from deltahub.errors import InvalidArtifact
from deltahub.methods import registry as method_registry
from deltahub.registry import Registry
from tests.compose_helpers import ids, tiny

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def readme_method_folder() -> dict[str, str]:
    """{file name: source} of the method folder shown in README's architecture section."""
    start = README.index("## Architecture")
    end = README.find("\n## ", start + 1)
    found = {}
    for block in re.findall(r"```python\n(.*?)```", README[start : end if end != -1 else None], re.S):
        first = block.splitlines()[0]
        m = re.match(r"# scale/(\w+\.py)", first)
        if m:
            found[m.group(1)] = block
    return found


@pytest.fixture
def scale_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The README's `scale` folder, importable, registered for this test only."""
    files = readme_method_folder()
    assert set(files) == {"__init__.py", "schema.py", "runtime.py"}
    # The claim: the registration is one line (besides its import).
    calls = [ln for ln in files["__init__.py"].splitlines() if ln.startswith("register_method(")]
    assert len(calls) == 1 and calls[0].endswith(")")
    root = tmp_path / "plugins"
    (root / "scale").mkdir(parents=True)
    for name, source in files.items():
        (root / "scale" / name).write_text(source)
    method_registry.known_methods()  # built-ins first, so the copy below holds them
    monkeypatch.setattr(method_registry, "_METHODS", dict(method_registry._METHODS))
    monkeypatch.syspath_prepend(str(root))
    for mod in ("scale", "scale.schema", "scale.runtime"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    import scale  # noqa: F401  (its one line registers the method)

    yield root
    for mod in ("scale", "scale.schema", "scale.runtime"):
        sys.modules.pop(mod, None)


def scaled_copy(base: torch.nn.Module, gains: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base with y' = g * y folded into each target: W' = diag(g) W, b' = g * b."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for path, g in gains.items():
            layer = ref.get_submodule(path)
            layer.weight.mul_(g[:, None])
            if layer.bias is not None:
                layer.bias.mul_(g)
    return ref


def make_adapter(base: torch.nn.Module, seed: int) -> tuple[AdaptedModel, dict[str, torch.Tensor]]:
    model = AdaptedModel(copy.deepcopy(base))
    model.add_adapter("s", {"method": "scale", "target_modules": TARGETS})
    g = torch.Generator().manual_seed(seed)
    gains = {}
    with torch.no_grad():
        for p, layer in zip(model.get_adapter("s").paths, model.get_adapter("s").layers, strict=True):
            layer.scale_g.copy_(1 + 0.5 * torch.randn(layer.scale_g.shape, generator=g))
            gains[p] = layer.scale_g.detach().clone()
    return model, gains


def test_a_method_folder_publishes_loads_and_runs(scale_method: Path, tmp_path: Path) -> None:
    base = tiny("llama")
    x = ids()
    registry = Registry()
    gains = {}
    for seed, name in ((1, "demo/scale-a"), (2, "demo/scale-b")):
        trained, gains[name] = make_adapter(base, seed)
        trained.save_adapter("s", tmp_path / name)
        registry.publish(tmp_path / name, name)
    assert registry.resolve("demo/scale-a").method == "scale"

    model = AdaptedModel(copy.deepcopy(base), registry=registry)
    a, b = model.load("demo/scale-a"), model.load("demo/scale-b")
    with torch.no_grad():
        plain = model(x).logits
        model.activate(a)
        alone = model(x).logits
        model.activate(Sum(a, b, weights=[0.7, 0.4]))
        summed = model(x).logits
        want_alone = scaled_copy(base, gains["demo/scale-a"])(x).logits
        # Sum adds the weighted deltas: g = 1 + 0.7 (g_a - 1) + 0.4 (g_b - 1)
        g_sum = {
            p: 1 + 0.7 * (gains["demo/scale-a"][p] - 1) + 0.4 * (gains["demo/scale-b"][p] - 1)
            for p in TARGETS
        }
        want_sum = scaled_copy(base, g_sum)(x).logits
    assert (alone - plain).abs().max() > 1e-2  # the adapter does change the output
    torch.testing.assert_close(alone, want_alone, atol=1e-5, rtol=1e-5)  # float32
    torch.testing.assert_close(summed, want_sum, atol=1e-5, rtol=1e-5)


def test_the_folder_schema_guards_publish(scale_method: Path, tmp_path: Path) -> None:
    af.write_dir(
        tmp_path / "bad",
        {"model.layers.0.self_attn.q_proj.scale_g": torch.ones(4, 4)},
        {"method": "scale", "target_modules": TARGETS},
        af.Manifest(name="bad", method="scale"),
    )
    with pytest.raises(InvalidArtifact) as e:
        Registry().publish(tmp_path / "bad", "bad")
    assert e.value.rule == "config-shape"


def test_the_folder_schema_validates_without_torch(scale_method: Path, tmp_path: Path) -> None:
    trained, _ = make_adapter(tiny("llama"), 3)
    trained.save_adapter("s", tmp_path / "good")
    code = (
        "import sys, scale\n"
        "from deltahub import artifact as af\n"
        f"assert af.load_dir({str(tmp_path / 'good')!r}).method == 'scale'\n"
        "assert 'torch' not in sys.modules, 'validating imported torch'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(scale_method), os.getcwd()])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
