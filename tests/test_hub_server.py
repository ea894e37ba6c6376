"""End-to-end checks of the offline Hub server (`tests/hub_server.py`) with the real huggingface_hub / transformers."""

import json
import os
import random
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import huggingface_hub
import pytest
from hub_server import LocalHub, git_blob_sha, hub_env, patch_hub_constants
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

REPO = "org/tiny"
BIG = random.Random(0).randbytes(1 << 20)  # ~1 MB binary file
README = "---\nlicense: apache-2.0\ntags: [test]\n---\n# Tiny test repo\n"
FILES = {
    "README.md": README.encode(),
    "config.json": json.dumps({"model_type": "llama", "hidden_size": 16}).encode(),
    "weights.bin": BIG,
    "nested/deep/notes.txt": b"nested file\n",
}


@pytest.fixture
def hub(tmp_path):
    """A running LocalHub with huggingface_hub's module constants pointed at it and caches under tmp_path/hf."""
    with LocalHub() as hub, patch_hub_constants(hub, tmp_path / "hf"):
        yield hub


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.endpoint, token=False)


def _write_tree(root, files):
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


@pytest.fixture
def uploaded(api, hub, tmp_path):
    """REPO created and FILES uploaded through the real client; returns the upload commit sha."""
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url.endpoint == hub.endpoint
    info = api.upload_folder(folder_path=_write_tree(tmp_path / "upload", FILES), repo_id=REPO)
    assert info.oid == hub.head(REPO)
    return info.oid


def test_patch_hub_constants_points_client_at_server_and_restores(tmp_path):
    before = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_CACHE)
    with LocalHub() as hub:
        with patch_hub_constants(hub, tmp_path) as env:
            assert constants.ENDPOINT == hub.endpoint == env["HF_ENDPOINT"]
            assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub.endpoint + "/")
            assert constants.HF_HUB_CACHE == str(tmp_path / "hub")
            assert constants.HF_HUB_OFFLINE is False and constants.HF_HUB_DISABLE_XET is True
            assert HfApi().endpoint == hub.endpoint
        env = hub_env(hub, tmp_path)
        assert env["HF_ENDPOINT"] == hub.endpoint and env["HF_HUB_OFFLINE"] == "0"
        assert env["HF_HUB_DISABLE_XET"] == "1" and env["HF_HUB_CACHE"] == str(tmp_path / "hub")
    assert (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_CACHE) == before


def test_create_repo_conflict_and_exist_ok(api, hub):
    api.create_repo(REPO)
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO)
    assert excinfo.value.response.status_code == 409
    # The initial commit exists, so `main` resolves right away.
    assert api.model_info(REPO).sha == hub.head(REPO)
    assert api.model_info(REPO).siblings == []


def test_upload_download_and_metadata(api, hub, uploaded, tmp_path):
    assert hub.files(REPO) == FILES

    # hf_hub_download: module-level function through the patched constants.
    for path, data in FILES.items():
        local = hf_hub_download(REPO, path)
        assert open(local, "rb").read() == data
        assert f"snapshots/{uploaded}/" in local.replace(os.sep, "/")
        assert local.startswith(str(tmp_path / "hf" / "hub"))
    # Same thing by commit sha and with an explicit endpoint + cache_dir (no constants needed).
    local = hf_hub_download(REPO, "weights.bin", revision=uploaded, endpoint=hub.endpoint, cache_dir=tmp_path / "c2")
    assert open(local, "rb").read() == BIG

    # model_info
    info = api.model_info(REPO, files_metadata=True)
    assert info.id == REPO and info.sha == uploaded and info.private is False
    assert sorted(s.rfilename for s in info.siblings) == sorted(FILES)
    sizes = {s.rfilename: (s.size, s.blob_id) for s in info.siblings}
    assert sizes["weights.bin"] == (len(BIG), git_blob_sha(BIG))

    # list_repo_tree: root (non recursive), recursive, and a sub-path
    root = list(api.list_repo_tree(REPO))
    assert {e.path for e in root if isinstance(e, RepoFolder)} == {"nested"}
    assert {e.path for e in root if isinstance(e, RepoFile)} == {"README.md", "config.json", "weights.bin"}
    everything = list(api.list_repo_tree(REPO, recursive=True))
    assert {e.path for e in everything if isinstance(e, RepoFile)} == set(FILES)
    assert {e.path for e in everything if isinstance(e, RepoFolder)} == {"nested", "nested/deep"}
    sub = list(api.list_repo_tree(REPO, "nested", recursive=True))
    assert [(type(e), e.path) for e in sub] == [(RepoFolder, "nested/deep"), (RepoFile, "nested/deep/notes.txt")]
    assert sorted(api.list_repo_files(REPO)) == sorted(FILES)
    assert api.file_exists(REPO, "nested/deep/notes.txt") and not api.file_exists(REPO, "nope.txt")

    # snapshot_download
    folder = snapshot_download(REPO)
    assert folder.replace(os.sep, "/").endswith(f"snapshots/{uploaded}")
    for path, data in FILES.items():
        assert open(os.path.join(folder, path), "rb").read() == data

    # HF_HUB_OFFLINE=1: everything comes from the cache and no request reaches the server.
    hub.clear_requests()
    with patch_hub_constants(hub, tmp_path / "hf", offline=True):
        assert open(hf_hub_download(REPO, "weights.bin"), "rb").read() == BIG
        assert snapshot_download(REPO) == folder
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(REPO, "never-downloaded.txt")
    assert hub.requests == []


def test_second_commit_deletes_file(api, hub, uploaded):
    # Re-uploading identical content is a no-op, like on the Hub (preupload returns the remote oids).
    same = api.upload_file(path_or_fileobj=FILES["config.json"], path_in_repo="config.json", repo_id=REPO)
    assert same.oid == uploaded

    deleted = api.delete_file("nested/deep/notes.txt", repo_id=REPO, commit_message="drop notes")
    assert deleted.oid != uploaded and deleted.oid == hub.head(REPO)
    assert sorted(s.rfilename for s in api.model_info(REPO).siblings) == sorted(set(FILES) - {"nested/deep/notes.txt"})
    assert [c.title for c in api.list_repo_commits(REPO)][:2] == ["drop notes", "Upload folder using huggingface_hub"]

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nested/deep/notes.txt")
    # Still reachable at the previous commit.
    old = hf_hub_download(REPO, "nested/deep/notes.txt", revision=uploaded)
    assert open(old, "rb").read() == FILES["nested/deep/notes.txt"]
    assert api.model_info(REPO, revision=uploaded).sha == uploaded

    # A folder deletion ("deletedFolder" line), then deleting a file that is already gone.
    api.upload_file(path_or_fileobj=b"1", path_in_repo="sub/dir/a.txt", repo_id=REPO)
    api.delete_folder("sub", repo_id=REPO)
    assert not any(path.startswith("sub/") for path in hub.files(REPO))
    with pytest.raises(EntryNotFoundError):
        api.delete_file("nested/deep/notes.txt", repo_id=REPO)


def test_missing_entries_raise_hub_errors(api, hub, uploaded, tmp_path):
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "does-not-exist.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="0" * 40)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="org/missing")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, "no-such-dir"))


def test_replace_and_delete_helpers(hub, uploaded):
    assert open(hf_hub_download(REPO, "config.json"), "rb").read() == FILES["config.json"]

    corrupted = hub.replace_file(REPO, "config.json", b"{not json")
    assert corrupted != uploaded and hub.head(REPO) == corrupted
    assert open(hf_hub_download(REPO, "config.json"), "rb").read() == b"{not json"

    hub.delete_file(REPO, "weights.bin")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "weights.bin")
    assert "weights.bin" in hub.files(REPO, revision=uploaded)


def test_raw_http_headers_and_range(hub, uploaded):
    url = f"{hub.endpoint}/{REPO}/resolve/main/weights.bin"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as r:
        assert r.headers["X-Repo-Commit"] == uploaded
        assert r.headers["ETag"] == f'"{git_blob_sha(BIG)}"'
        assert int(r.headers["Content-Length"]) == len(BIG)
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=10-19"})) as r:
        assert r.status == 206 and r.read() == BIG[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(BIG)}"
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(f"{hub.endpoint}/{REPO}/resolve/main/missing.txt")
    assert excinfo.value.code == 404
    assert excinfo.value.headers["X-Error-Code"] == "EntryNotFound"
    assert excinfo.value.headers["X-Repo-Commit"] == uploaded


def test_transformers_from_pretrained_roundtrip(hub, tmp_path):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "tiny")
    # Module-level functions are bound to `huggingface_hub.hf_api.api`, whose endpoint the patch also redirects.
    huggingface_hub.create_repo("org/tiny-llama")
    huggingface_hub.upload_folder(folder_path=tmp_path / "tiny", repo_id="org/tiny-llama")

    def assert_same_weights(loaded):
        expected, actual = model.state_dict(), loaded.state_dict()
        assert expected.keys() == actual.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
        assert loaded.config.hidden_size == 16 and loaded.config.vocab_size == 64

    assert_same_weights(transformers.LlamaForCausalLM.from_pretrained("org/tiny-llama"))
    assert ("GET", "/org/tiny-llama/resolve/" + hub.head("org/tiny-llama") + "/model.safetensors") in hub.requests

    # HF_HUB_OFFLINE=1: transformers loads the cached snapshot without touching the server.
    hub.clear_requests()
    with patch_hub_constants(hub, tmp_path / "hf", offline=True):
        assert_same_weights(transformers.LlamaForCausalLM.from_pretrained("org/tiny-llama"))
    assert hub.requests == []

    # push_to_hub goes through transformers' own cached HfApi (reset by the patch).
    model.push_to_hub("org/pushed")
    assert {"config.json", "model.safetensors"} <= set(hub.files("org/pushed"))


def test_subprocess_uses_env(hub, api, uploaded, tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from huggingface_hub import constants, hf_hub_download, snapshot_download
        assert constants.HF_HUB_DISABLE_XET and not constants.HF_HUB_OFFLINE
        path = hf_hub_download("org/tiny", "nested/deep/notes.txt")
        assert path.startswith(constants.HF_HUB_CACHE), path
        sys.stdout.write(open(path).read() + constants.ENDPOINT)
        """
    )
    cache = tmp_path / "subprocess-home"
    env = {**os.environ, **hub_env(hub, cache)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "nested file\n" + hub.endpoint
    assert (cache / "hub" / "models--org--tiny").is_dir()
