"""Shared fixtures: tiny models, the synthetic corpus, the HTTP server, moto S3, local Ray.
(The `ray start --head` node for job submission is tests/orchestration/conftest.py's.)"""
from __future__ import annotations

import os
import tempfile
import uuid

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The session's own HF cache (huggingface_hub reads it at import): tests put tiny models there under
# real repo ids (tests/helpers/hf_cache.py), never into a developer's cache.
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="blip2-test-hf-cache-")
# Ray Train's controller takes its workers' reports, and so registers their checkpoints, once per
# poll: every 2 s by default, where the tests' short runs checkpoint every step or two. It reads
# this from the driver's environment; every Ray the tests start inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

from orchestration.ray_session import free_port  # noqa: E402
from tests.helpers.servers import start_http_server, start_recording_server  # noqa: E402

_background: list = []


def pytest_collection_finish(session):
    """Start the selected tests' background parts (tests.helpers.background) right away."""
    if session.config.option.collectonly:
        return
    from tests.helpers.background import start_marked

    root = session.config._tmp_path_factory.mktemp("background", numbered=True)
    _background.extend(start_marked(session.items, root))


def pytest_sessionfinish(session):
    for handle in _background:
        handle.stop()
    import shutil

    shutil.rmtree(os.environ["HF_HUB_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on a 2-core machine: one intra-op torch thread per process is faster (and far
    faster when the machine is busy) than two threads fighting Ray's processes for the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> directory of every tiny model (bert, vision, vision_eva, captioner, ranker, opt, t5)."""
    from orchestration.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"), seed=0)


@pytest.fixture(scope="session")
def hf_paper_cache(tiny_models, tmp_path_factory):
    """repo id -> snapshot: the paper's models, tiny, under their real ids in the session's HF
    cache (``HF_HUB_OFFLINE=1``: ``from_pretrained("facebook/opt-2.7b")`` loads the tiny OPT)."""
    from tests.helpers.hf_cache import populate_paper_models

    return populate_paper_models(os.environ["HF_HUB_CACHE"], tiny_models, tmp_path_factory.mktemp("hf-repos"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """(folder, items): 48 synthetic images with true captions, seed 0."""
    from pipelines.synthetic import make_corpus

    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root, n=48, seed=0)


@pytest.fixture(scope="session")
def http_server(corpus):
    """The corpus (and hostile routes, see tests.helpers.servers) on http://127.0.0.1:<port>."""
    server = start_http_server(corpus[0])
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def recorder():
    """A request recorder on 127.0.0.2, which no test's allow-list includes: a broken address guard
    would show up in its ``seen`` list (and still only reach this machine)."""
    server = start_recording_server("127.0.0.2")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def img2dataset_folders(tmp_path_factory, http_server, corpus):
    """({format: folder}, {url: caption}): the real img2dataset CLI's output in each of its formats."""
    from tests.helpers.img2dataset import img2dataset_folders as build

    return build(tmp_path_factory.mktemp("img2dataset"), http_server.base_url, corpus[1])


@pytest.fixture(scope="session")
def s3_server():
    """A real moto S3 server on 127.0.0.1; the AWS env vars point every client at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; returns its ``s3://name`` URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray instance for the session (started after moto so workers inherit its env)."""
    from orchestration.config import RayConfig
    from orchestration.ray_session import ensure_ray

    ray = ensure_ray(RayConfig(num_cpus=4, log_to_driver=False))  # as every command starts local Ray
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
