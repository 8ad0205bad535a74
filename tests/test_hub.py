"""Models named by Hub id are fetched into the HF cache on first use (issue 39, item 4), tested
against a stand-in Hub on 127.0.0.1 (HF_ENDPOINT) serving tiny models built here. The extractors
run in child processes: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME at import,
and the suite itself stays offline (conftest). Protocol as huggingface_hub 2.x speaks it:
GET /api/models/{repo}/revision/{rev} (sha, siblings) and HEAD/GET /{repo}/resolve/{rev}/{file}
(X-Repo-Commit, ETag, Content-Length)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.base import create
from manifests.schema import Utterance

ROOT = Path(__file__).resolve().parents[1]
BERT, W2V = "imer-test/tiny-bert", "imer-test/tiny-w2v"
TEXT = "the cat sat on the mat"
# files a real Hub repo also carries that must never be fetched: other weight formats, subfolders
JUNK = {"tf_model.h5": b"tf", "flax_model.msgpack": b"flax", "pytorch_model.bin": b"not loaded",
        "onnx/model.onnx": b"onnx"}


def _tiny_bert(path: Path, seed: int) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                               "the", "cat", "sat", "on", "mat"]) + "\n")
    BertTokenizerFast.from_pretrained(path, do_lower_case=True).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=20, max_position_embeddings=32)
    BertModel(cfg).eval().save_pretrained(path)
    return path


def _tiny_w2v(path: Path) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                         conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4),
                         num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    Wav2Vec2Model(cfg).eval().save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(path)
    return path


def _files(d: Path) -> dict[str, bytes]:
    return {**{str(f.relative_to(d)): f.read_bytes() for f in d.rglob("*") if f.is_file()}, **JUNK}


class StandInHub:
    """repos: id -> {"main": commit, commit: {filename: bytes}}. Records (method, path) served."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.log: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stuck client cannot hold a handler thread

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                path = self.path.split("?")[0]
                hub.log.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo, rev = "/".join(parts[2:4]), (parts[5] if len(parts) > 5 else "main")
                    found = hub._lookup(repo, rev)
                    if found is None:
                        return self._missing()
                    sha, files = found
                    data = json.dumps({"id": repo, "sha": sha,
                                       "siblings": [{"rfilename": f} for f in sorted(files)]}).encode()
                    return self._send(data, {"Content-Type": "application/json"}, body)
                if len(parts) >= 5 and parts[2] == "resolve":
                    found = hub._lookup("/".join(parts[:2]), parts[3])
                    name = "/".join(parts[4:])
                    if found is None or name not in found[1]:
                        return self._missing(entry=found is not None)
                    data = found[1][name]
                    return self._send(data, {"X-Repo-Commit": found[0],
                                             "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)
                self._missing()

            def _send(self, data: bytes, headers: dict, body: bool):
                self.send_response(200)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _missing(self, entry: bool = False):
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound" if entry else "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def _lookup(self, repo: str, rev: str):
        r = self.repos.get(repo)
        if r is None:
            return None
        sha = r["main"] if rev == "main" else rev
        return (sha, r[sha]) if sha in r else None

    def publish(self, repo: str, folder: Path) -> str:
        """A new commit of ``repo`` holding ``folder``'s files (plus JUNK); main points at it."""
        files = _files(folder)
        sha = hashlib.sha1(repr(sorted((k, v) for k, v in files.items())).encode()).hexdigest()
        self.repos.setdefault(repo, {})[sha] = files
        self.repos[repo]["main"] = sha
        return sha

    def gets(self) -> set[str]:
        return {p for m, p in self.log if m == "GET"}


@pytest.fixture
def hub():
    h = StandInHub()
    h.thread.start()
    yield h
    h.server.shutdown()  # stops serve_forever; the test's server never outlives it
    h.server.server_close()


SCRIPT = r"""
import json, sys
import soundfile as sf, numpy as np
from extract.base import ExtractorUnavailable, create
from manifests.schema import Media, Utterance
out = {}
b = create("bert", model=sys.argv[1])
out["bert"] = {"identity": b.model_identity(), "key": b.key,
               "features": b.extract([Utterance(id="u", text=sys.argv[3])])[0].features.tolist()}
w = create("wav2vec2", model=sys.argv[2])
w.check_available()
sf.write(sys.argv[4], np.sin(np.arange(8000) / 7.0).astype("float32"), 16000)
feats = w.extract([Utterance(id="a", audio=Media(path=sys.argv[4]))])[0].features
out["w2v"] = {"identity": w.model_identity(), "key": w.key, "features": feats.tolist()}
for name in sys.argv[5:]:
    try:
        create("bert", model=name).key
    except ExtractorUnavailable as e:
        out[name] = str(e)
print("RESULT " + json.dumps(out))
"""


def _run(tmp_path, hub, hf_home, *, offline=False, absent=()):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    p = subprocess.run([sys.executable, "-c", SCRIPT, BERT, W2V, TEXT, str(tmp_path / "a.wav"), *absent],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), p.stderr


def test_hub_id_is_fetched_on_first_use_then_served_from_the_cache(tmp_path, hub):
    bert1 = _tiny_bert(tmp_path / "bert1", seed=0)
    w2v = _tiny_w2v(tmp_path / "w2v")
    sha1, w2v_sha = hub.publish(BERT, bert1), hub.publish(W2V, w2v)

    # 1. online, empty cache: downloaded with progress bars; the key records the resolved commit
    got, err = _run(tmp_path, hub, tmp_path / "hf-a", absent=["imer-test/absent"])
    assert got["bert"]["identity"] == {"id": BERT, "revision": sha1}
    assert got["w2v"]["identity"] == {"model": W2V, "revision": None, "commit": w2v_sha}
    assert "imer: fetching imer-test/tiny-bert" in err and "model.safetensors" in err and "100%" in err
    want = create("bert", model=str(bert1)).extract([Utterance(id="u", text=TEXT)])[0].features
    np.testing.assert_allclose(np.asarray(got["bert"]["features"]), want, atol=1e-5)
    assert np.asarray(got["w2v"]["features"]).shape[1] == 16
    assert "no such model" in got["imer-test/absent"] and hub.url in got["imer-test/absent"]
    fetched = {p.split("/resolve/")[1].split("/", 1)[1] for p in hub.gets() if "/resolve/" in p}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "preprocessor_config.json"} <= fetched
    assert not fetched & set(JUNK)  # one weight format, no TF/Flax/ONNX copies
    snap = tmp_path / "hf-a" / "hub" / "models--imer-test--tiny-bert"
    assert (snap / "refs" / "main").read_text() == sha1 and (snap / "snapshots" / sha1 / "model.safetensors").is_file()

    # 2. another checkout with its own cache fetches the same commit: same store keys
    again, _ = _run(tmp_path, hub, tmp_path / "hf-b")
    assert again["bert"]["key"] == got["bert"]["key"] and again["w2v"]["key"] == got["w2v"]["key"]

    # 3. offline: the cache alone serves, nothing is asked of the Hub; a model not cached says how to provide it
    n = len(hub.log)
    off, _ = _run(tmp_path, hub, tmp_path / "hf-a", offline=True, absent=["imer-test/absent"])
    assert len(hub.log) == n
    assert off["bert"] == got["bert"] and off["w2v"]["key"] == got["w2v"]["key"]
    msg = off["imer-test/absent"]
    assert "HF_HUB_OFFLINE" in msg and "HF_HOME" in msg and "model=/path/to/dir" in msg

    # 4. main moves to a new commit: the next online run fetches it and the key changes with it
    sha2 = hub.publish(BERT, _tiny_bert(tmp_path / "bert2", seed=1))
    moved, _ = _run(tmp_path, hub, tmp_path / "hf-a")
    assert moved["bert"]["identity"] == {"id": BERT, "revision": sha2} and moved["bert"]["key"] != got["bert"]["key"]
    assert moved["w2v"]["key"] == got["w2v"]["key"]
