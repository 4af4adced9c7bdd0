"""Shared test set-up: 8 fake CPU devices, full-precision float32 matmuls, fixture paths."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the whole suite (all workers and the processes
# tests launch): identical programs compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"deltamem-jax-test-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
# The shared read-only data (fixtures, LoCoMo) sit next to the repository; a clone
# elsewhere finds them through DELTAMEM_FIXTURES / DELTAMEM_LOCOMO or /work/shared.
_SHARED = next((p for p in (REPO.parent / "shared", pathlib.Path("/work/shared"))
                if p.is_dir()), REPO.parent / "shared")
os.environ.setdefault("DELTAMEM_LOCOMO", str(_SHARED / "data" / "locomo10.json"))
FIXTURES = pathlib.Path(os.environ.get(
    "DELTAMEM_FIXTURES", _SHARED / "fixtures" / "official-parity"))


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    """The authors'-release parity fixtures (must exist: they are the ground truth)."""
    if not (FIXTURES / "cases" / "index.json").is_file():
        raise FileNotFoundError(
            f"official-parity fixtures not found at {FIXTURES}; set DELTAMEM_FIXTURES")
    return FIXTURES
