"""`hyla data prepare` on the embedded local Ray: a store that training takes, a rerun that
keeps it, and bad input as one line."""

from __future__ import annotations

import json
import tempfile

import numpy as np

from hyla.jobs.cli import main
from hyla.platform.data import DataConfig, TokenStore, load_tokenizer, token_streams


def test_prepare_writes_a_store_and_a_rerun_keeps_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where Ray's log goes
    lines = [json.dumps({"body": f"document {i} " * (i % 5 + 1)}) for i in range(200)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    keys = ["data.source=a.jsonl", "data.text_field=body", "data.shard_bytes=2048"]
    keys.append("data.val_fraction=0.1")
    assert main(["data", "prepare", "--out", "store", *keys]) == 0
    out = capsys.readouterr().out
    assert f"train on it with data.source={tmp_path}/store" in out
    store = TokenStore(str(tmp_path / "store"))
    held = store.manifest["validation"]
    assert f"{held['documents']} of them ({held['tokens']:,} tokens) held out" in out
    logs = list((tmp_path / "tmp" / "hyla").glob("prepare-*.log"))
    assert len(logs) == 1 and f"(Ray's output: {logs[0]})" in out
    assert len(store.manifest["shards"]) > 1
    cfg = DataConfig(source=str(tmp_path / "a.jsonl"), text_field="body", val_fraction=0.1)
    parts = (store.part(validation=False), store.part(validation=True))
    for part, want in zip(parts, token_streams(cfg, load_tokenizer(cfg)), strict=True):
        assert np.array_equal(part.tokens(0, len(part)), want)

    manifest = tmp_path / "store" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    assert main(["data", "prepare", "--out", "store", *keys]) == 0
    assert manifest.stat().st_mtime_ns == written  # the complete store is kept as it is

    capsys.readouterr()
    kept_logs = set((tmp_path / "tmp" / "hyla").iterdir())
    assert main(["data", "prepare", "--out", "other", "data.source=a.jsonl"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # Ray's own lines come first
    assert last.startswith("hyla: error: data.text_field 'text' is missing in")
    assert "a.jsonl" in last
    assert main(["data", "prepare", "--out", "x", "data=mqar"]) == 2
    assert "needs a raw data.source" in capsys.readouterr().err
    assert set((tmp_path / "tmp" / "hyla").iterdir()) == kept_logs  # none for bad input
