"""The checkout layout: passes/, kernels/, export/ and cli/ are the packages ditopt.passes, ...

From a checkout's root they are also importable as top-level `kernels`, `passes`, ...; and
transformers imports a top-level `kernels` to probe for the Hugging Face package of that name
(diffusers' SD3 model pulls that probe in). That import must not run ditopt's submodules a second
time: re-registering `torch.ops.ditopt.*` left the ops ditopt holds dangling, and the next call of
one segfaulted (seen in this suite, depending on test order)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import torch
import torch._library.custom_ops as custom_ops
import ditopt.kernels as real
import ditopt.passes
import importlib
for name in ("kernels", "passes", "export", "cli"):  # what transformers' package probe does
    importlib.import_module(name)
import kernels

again = sorted(m for m in sys.modules if m.split(".")[0] in ("kernels", "passes", "export", "cli") and "." in m)
assert not again, f"submodules ran a second time under top-level names: {again}"
for name in ("block_sparse_attention", "neighborhood_attention"):
    assert custom_ops.OPDEFS[f"ditopt::{name}"] is getattr(real.ops, name), f"ditopt::{name} was re-registered"
assert kernels.block_sparse_attention is real.block_sparse_attention
try:  # installed with the bench extra (diffusers' SD3 model pulls it in), not by the dev extra
    from transformers.utils.import_utils import is_kernels_available
except ImportError:
    pass
else:
    assert not is_kernels_available(), "ditopt's kernels/ passed for the Hugging Face kernels package"
q = torch.randn(1, 2, 3 + 64, 16)
out = real.block_sparse_attention(q, q, q, 16, 0.5, 3)
assert torch.allclose(out, real.block_sparse_attention_cpu(q, q, q, 16, 0.5, 3))
print("ok")
"""


def test_top_level_import_from_checkout_root_is_an_alias_not_a_second_registration():
    assert (ROOT / "kernels" / "__init__.py").exists()
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_optimizing_and_exporting_import_no_extra():
    """matplotlib and scikit-learn are extras (plots, zoo; tqdm comes with diffusers): the core, the passes and export
    must not import them, so `pip install ditopt` optimizes and exports without them."""
    script = (
        "import sys, ditopt, ditopt.passes, ditopt.export, ditopt.kernels\n"
        "from ditopt.registry import available_passes; available_passes()\n"
        "bad = sorted(m for m in ('matplotlib', 'sklearn') if m in sys.modules)\n"
        "assert not bad, bad\nprint('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT / "tests")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_missing_extra_names_the_pip_extra():
    import pytest

    from ditopt.errors import MissingExtraError, require_extra

    with pytest.raises(MissingExtraError, match=r'pip install "ditopt\[plots\]"'):
        require_extra("no_such_module_for_ditopt", "plots", "a picture")


def test_every_package_folder_is_in_the_wheel():
    # pyproject lists the packages (the checkout's top-level folders map into ditopt.*): a new
    # pass family's folder that is not listed would import from a checkout and be missing from
    # an installed wheel. Listing it is the one line outside the folder a family needs.
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, roots = set(config["packages"]), config["package-dir"]
    for package, folder in roots.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([package, *rel.parts])
            assert name in listed, f"{init.parent.relative_to(ROOT)} is not in pyproject's packages (add {name!r})"
