"""Shared fixtures: small shapes worlds and feature caches, built once per test session (`tiny_root`: the
`debug=tiny` world and cache the end-to-end runs read), and the two ways to run a command: `run_here` in this
process (no interpreter start) and `run_cli` in a separate one (DDP, launchers, kill -9)."""

from __future__ import annotations

import os
import resource
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here: fail at once instead of retrying

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A small shapes world (60/20/20 images) as a CaptionDataset."""
    from captioner.data.shapes import build_shapes

    root = tmp_path_factory.mktemp("shapes")
    return build_shapes(root, num_train=60, num_val=20, num_test=20, seed=3, progress=False)


@pytest.fixture(scope="session")
def lite0():
    """The packaged EfficientNet-Lite0 encoder (real ImageNet weights)."""
    from captioner.encoders import EncoderSpec, FrozenEncoder

    return FrozenEncoder(EncoderSpec(name="efficientnet_lite0", weights="package"))


def load_realistic_builder():
    """tests/fixtures/realistic/build.py (the realistic Flickr8k fixture's builder and its data) as the module
    `realistic_build`; tests/fixtures is no package, so it is loaded by path, once."""
    import importlib.util
    import sys

    name = "realistic_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "fixtures" / "realistic" / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def realistic_flickr8k(tmp_path_factory):
    """Root of a small realistic dataset in the Flickr8k original-release layout (37 real photos of mixed sizes from
    skimage.data, hand-written captions with punctuation and rare words, messy token-file lines), with the same data
    as a Karpathy split JSON (dataset_flickr8k.json) in the same root. See tests/fixtures/realistic/build.py."""
    return load_realistic_builder().build_realistic(tmp_path_factory.mktemp("realistic_flickr8k"))


@contextmanager
def counting(encoder):
    """The sizes of the batches `encoder` is run on within the block (a list)."""
    seen: list[int] = []
    original = encoder.forward
    encoder.forward = lambda x: (seen.append(int(x.shape[0])), original(x))[1]
    try:
        yield seen
    finally:
        del encoder.forward


@contextmanager
def file_size_limit(limit: int):
    """Files of this process cannot grow past `limit` bytes: writes fail with EFBIG, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


# Test files whose tests all run a CLI command or a training run: marked `e2e` here; in other files such tests
# (and those that start processes, run Java or train for seconds)
# carry @pytest.mark.e2e themselves. `make test-fast` leaves e2e tests out.
E2E_FILES = {"test_benchmark.py", "test_commands.py", "test_extending.py", "test_inference.py", "test_launchers.py",
             "test_realistic_run.py", "test_resume.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in E2E_FILES:
            item.add_marker(pytest.mark.e2e)


def run_cli(args, root=None, *, timeout=600, env=None, cwd=REPO):
    """`python args...` in a separate process (for what needs one: DDP, launchers, a process-wide limit, the
    installed entry points), with CAPTIONER_ROOT=root, W&B off and `env` on top; a key set to None is removed.
    The CompletedProcess (text) with `.seconds`, its wall time."""
    import subprocess
    import sys
    import time

    full = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true")
    full.pop("LOCAL_RANK", None)  # a DDP environment of the caller must not leak into the runs
    if root is not None:
        full["CAPTIONER_ROOT"] = str(root)
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = str(value)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full, capture_output=True, text=True,
                       timeout=timeout)
    r.seconds = time.perf_counter() - t0
    return r


def run_here(args, root=None, *, timeout=None, env=None, cwd=REPO):
    """`python args...` as run_cli runs it (same arguments and result: a CompletedProcess with .seconds), but in
    this process: for a command whose test is not about the process itself it saves the ~8 s that a new
    interpreter spends importing torch, Lightning and timm. args: a script and its arguments, `-m module ...` or
    `-c code ...`. The command sees what a process would: its argv, cwd, environment (OMP_NUM_THREADS as the torch
    thread count), its own stdout and stderr (fd and Python level), exit status from SystemExit or 1 with a
    traceback. All of that, and the logging handlers it adds (Hydra's train.log), are undone afterwards.
    `timeout` is accepted for run_cli's signature and not enforced."""
    import runpy
    import subprocess
    import sys
    import time
    import traceback
    import warnings

    import torch

    args = [str(a) for a in args]
    environ, argv, path, folder = dict(os.environ), sys.argv, list(sys.path), os.getcwd()
    threads = torch.get_num_threads()
    os.environ.update(WANDB_MODE="disabled", WANDB_SILENT="true")
    os.environ.pop("LOCAL_RANK", None)
    if root is not None:
        os.environ["CAPTIONER_ROOT"] = str(root)
    for key, value in (env or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)
    if "OMP_NUM_THREADS" in (env or {}):
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or threads))
    os.chdir(cwd)
    t0 = time.perf_counter()
    status = 0
    try:
        with _own_output() as output, _logging_restored(), warnings.catch_warnings():
            try:
                warnings.simplefilter("default")  # as in a new interpreter: to the command's stderr, once per place
                warnings.showwarning = _warning_to_stderr
                warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)  # -m of a loaded module
                if args[0] == "-m":
                    sys.argv = [args[1], *args[2:]]
                    sys.path.insert(0, str(cwd))
                    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
                elif args[0] == "-c":
                    sys.argv = ["-c", *args[2:]]
                    sys.path.insert(0, str(cwd))
                    exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
                else:
                    script = (Path(cwd) / args[0]).resolve()
                    sys.argv = args
                    sys.path.insert(0, str(script.parent))
                    runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:  # sys.exit("message") prints the message and exits with 1, as Python does
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
                status = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:  # an uncaught error: what the interpreter would print, and its exit status
                traceback.print_exc()
                status = 1
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.argv, sys.path[:] = argv, path
        torch.set_num_threads(threads)
        os.chdir(folder)
    r = subprocess.CompletedProcess(args, status, output.stdout, output.stderr)
    r.seconds = time.perf_counter() - t0
    return r


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None):
    import sys
    import warnings

    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextmanager
def _own_output():
    """stdout and stderr of the block, at fd level (C code, child processes) and Python level, each in a file of
    its own; read into .stdout and .stderr of what it yields when the block ends."""
    import sys
    import tempfile
    from types import SimpleNamespace

    output = SimpleNamespace(stdout="", stderr="")
    streams = ours = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    try:
        for fd, f in zip((1, 2), files):
            os.dup2(f.fileno(), fd)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        ours = sys.stdout, sys.stderr
        yield output
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        _unbind_log_handlers_from(*ours)
        for name, f in zip(("stdout", "stderr"), files):
            f.seek(0)
            setattr(output, name, f.read().decode("utf-8", errors="replace"))
            f.close()


@contextmanager
def _logging_restored():
    """The logging configuration as it was before the block: a command configures logging for its process (Hydra's
    job_logging writes <run dir>/train.log); the handlers it added are closed, the levels put back."""
    import logging

    before = {lg: (list(lg.handlers), lg.level, lg.disabled, lg.propagate) for lg in _all_loggers()}
    try:
        yield
    finally:
        kept = {h for handlers, *_ in before.values() for h in handlers}
        for logger in _all_loggers():
            for handler in logger.handlers:
                if handler not in kept and isinstance(handler, logging.FileHandler):
                    handler.close()
            if logger in before:
                handlers, logger.level, logger.disabled, logger.propagate = before[logger]
                logger.handlers = handlers
            else:
                logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A CAPTIONER_ROOT holding the `debug=tiny` shapes world and its EfficientNet-Lite0 feature cache, prepared
    once per test session. End-to-end runs read it (their run dirs go elsewhere); a test that damages a world or a
    cache prepares its own."""
    root = tmp_path_factory.mktemp("tiny_root")
    r = run_here(["-m", "captioner.prepare", "debug=tiny"], root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture(scope="session")
def tiny_attention_run(tiny_root, tmp_path_factory, lite0):
    """A tiny trained dino_attention run (2 epochs on the tiny world's 40 images), trained once per session for
    the tests that use a trained model (inference, export, the web demo): (root, run dir). Its encoder weights
    are a local file, <run dir>/../lite0_copy.safetensors (the packaged Lite0's), as a user's own weights would be:
    the export test takes it away for a while. Tests must not modify the run."""
    from safetensors.torch import save_file

    run_dir = tmp_path_factory.mktemp("attention_run") / "run"
    weights = run_dir.parent / "lite0_copy.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.trunk.state_dict().items()}, str(weights))
    r = run_here(["train.py", "model=dino_attention", "trainer.max_epochs=2", "debug=tiny",
                  f"encoder.weights={weights}", f"hydra.run.dir={run_dir}"], tiny_root)
    assert r.returncode == 0, r.stderr[-3000:]
    return tiny_root, run_dir


def run_script(script: str, args, env=None) -> tuple[int, str]:
    """`python <script> args...` run in this process (run_here) for a test that reads only (exit status, stderr)."""
    r = run_here([script, *args], env=env)
    return r.returncode, r.stderr


def _all_loggers() -> list:
    import logging

    return [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                    if isinstance(lg, logging.Logger)]


def _unbind_log_handlers_from(*streams) -> None:
    """Log handlers made during a captured run (Lightning adds one when first imported) hold this test's capture
    stream, which is closed after it: point them at the real stderr (fd 2, captured again by later tests)."""
    import logging
    import sys

    for logger in _all_loggers():
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and any(handler.stream is s for s in streams):
                handler.setStream(sys.__stderr__)


def doubly_stochastic_reference(att, captions, pad_id=0):
    """Show-Attend-Tell's regulariser as the tutorial writes it, one caption and one token at a time:
    mean over captions b and tokens i of (1 - sum over the caption's predicting positions t of alpha[b, t, i])^2."""
    terms = []
    for b in range(att.shape[0]):
        n_words = int((captions[b, 1:] != pad_id).sum())  # positions predicting a word or <eos>
        for i in range(att.shape[2]):
            terms.append((1 - sum(float(att[b, t, i]) for t in range(n_words))) ** 2)
    return sum(terms) / len(terms)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tests on tiny tensors: more threads only add synchronisation, which
    turns pathological (tens of ms per op) when the CPU is shared with another busy process."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hostile_files(folder):
    """What users upload that is not a usable image, and one that is: (a text file named .jpg, a good JPEG, that
    JPEG truncated, a 20000x20000 PNG, whose header alone must get it refused)."""
    from PIL import Image

    text = folder / "notes.jpg"
    text.write_text("this is not an image")
    good = folder / "good.jpg"
    Image.new("RGB", (320, 240), (40, 90, 200)).save(good, quality=95)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    huge = folder / "huge.png"
    write_huge_png(huge, 20_000, 20_000)
    return text, good, truncated, huge


def write_huge_png(path, width, height):
    """A valid PNG header of width x height (no pixel data needed: the size alone must be refused)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
