"""Signed records: keys, the signed payload, verdicts on untrusted input, the keys command and
the submit path's sealer. The site's use of verdicts is in test_leaderboard.py."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helpers import TEST_KEY, TEST_KEY_FILE, make_record, trust_test_key
from metabench import cli, results, signing
from metabench.submissions import store


def _record(**kw) -> dict:
    return make_record("t", "f" * 16, "rule", np.full((3, 2), 0.5), **kw)


@pytest.fixture
def trusted(tmp_path):
    return signing.trusted_keys(trust_test_key(tmp_path / "keys").parent)


def test_a_signed_record_verifies_after_a_round_trip_through_its_file(tmp_path, trusted):
    path = results.write(tmp_path / "r.json", signing.sign(_record(), TEST_KEY))
    verdict = signing.verify(results.read(path), trusted)
    assert verdict == (signing.VERIFIED, f"signed by {TEST_KEY_FILE}") and verdict.verified
    sig = results.read(path)["signature"]
    assert sig["algorithm"] == "ed25519" and sig["key_id"] == signing.key_id(TEST_KEY)
    assert sig["public_key"] == signing.public_key_text(TEST_KEY)


def test_tuples_and_numpy_values_sign_as_they_read_back(tmp_path, trusted):
    rec = _record()
    rec["task"]["seeds"] = tuple(rec["task"]["seeds"])
    rec["wall_clock_s"] = np.float32(1.5)
    rec["runs"][0]["final_return"] = float("nan")  # stored as null
    signed = signing.sign(rec, TEST_KEY)
    assert signing.verify(signed, trusted).verified
    path = results.write(tmp_path / "r.json", signed)
    assert signing.verify(results.read(path), trusted).verified


def test_the_legacy_verified_flag_is_dropped_and_never_counts(trusted):
    signed = signing.sign({**_record(), "verified": True}, TEST_KEY)
    assert "verified" not in signed
    assert signing.verify({**signed, "verified": False}, trusted).verified
    assert signing.verify({**_record(), "verified": True}, trusted) == (
        signing.SELF_REPORTED, "no signature")


def test_a_record_edited_after_signing_is_self_reported(trusted):
    rec = signing.sign(_record(), TEST_KEY)
    rec["runs"][1]["score"] = 0.9
    assert signing.verify(rec, trusted) == (
        signing.SELF_REPORTED, "signature does not match the record (edited after signing?)")


def test_a_valid_signature_by_an_untrusted_key_is_self_reported(trusted):
    other = Ed25519PrivateKey.generate()
    verdict = signing.verify(signing.sign(_record(), other), trusted)
    assert verdict.status == signing.SELF_REPORTED
    assert verdict.reason == (f"signed by key {signing.key_id(other)}, which leaderboard/keys "
                              "does not trust")
    # Naming a trusted key id does not help: the trusted key itself must have signed.
    forged = signing.sign(_record(), other)
    forged["signature"]["key_id"] = signing.key_id(TEST_KEY)
    assert signing.verify(forged, trusted).reason.startswith("signature does not match")


def _with_sig(sig) -> dict:
    return {**_record(), "signature": sig}


KID = signing.key_id(TEST_KEY)


@pytest.mark.parametrize("record, reason", [
    (_record(), "no signature"),
    ("not a dict", "not a record"),
    (_with_sig("abc"), "malformed signature block (not an object)"),
    (_with_sig([1, 2]), "malformed signature block (not an object)"),
    (_with_sig({}), "unsupported signature algorithm (NoneType)"),
    (_with_sig({"algorithm": "rsa"}), "unsupported signature algorithm rsa"),
    (_with_sig({"algorithm": ["ed25519"]}), "unsupported signature algorithm (list)"),
    (_with_sig({"algorithm": "ed25519", "key_id": 5, "value": "AA=="}),
     "malformed signature block (key_id and value must be text)"),
    (_with_sig({"algorithm": "ed25519", "key_id": KID, "value": None}),
     "malformed signature block (key_id and value must be text)"),
    (_with_sig({"algorithm": "ed25519", "key_id": KID, "value": "not base64!"}),
     "malformed signature (not base64)"),
    (_with_sig({"algorithm": "ed25519", "key_id": KID, "value": "AAAA"}),  # 3 bytes
     "signature does not match the record (edited after signing?)"),
    (_with_sig({"algorithm": "ed25519", "key_id": "x" * 100, "value": ""}),
     "signed by key xxxxxxxxxxxxxxxx\u2026, which leaderboard/keys does not trust"),
])
def test_malformed_signatures_are_self_reported_never_a_crash(record, reason, trusted):
    assert signing.verify(record, trusted) == (signing.SELF_REPORTED, reason)


def test_an_uncheckable_record_is_self_reported(trusted):
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    rec = signing.sign(_record(), TEST_KEY)
    rec["extra"] = deep
    verdict = signing.verify(rec, trusted)
    assert verdict.status == signing.SELF_REPORTED and "cannot be checked" in verdict.reason


def test_trusted_keys_read_comments_and_name_a_malformed_file(tmp_path):
    keys = tmp_path / "keys"
    assert signing.trusted_keys(keys) == {}  # no folder: nothing trusted
    trust_test_key(keys, name="a.pub")
    (keys / "README.txt").write_text("not a key file")
    got = signing.trusted_keys(keys)
    assert list(got) == [KID] and got[KID].name == "a.pub"
    for text in ("# only a comment\n", "ed25519 !!!\n", "rsa AAAA\n", "ed25519 AAAA\n",
                 f"{signing.public_key_text(TEST_KEY)}\n{signing.public_key_text(TEST_KEY)}\n"):
        (keys / "b.pub").write_text(text)
        with pytest.raises(signing.KeyFileError, match=r"keys/b\.pub: "):
            signing.trusted_keys(keys)


def test_default_key_path_is_outside_any_repository(monkeypatch, tmp_path):
    monkeypatch.setenv("METABENCH_KEY", str(tmp_path / "k.pem"))
    assert signing.default_key_path() == tmp_path / "k.pem"
    monkeypatch.delenv("METABENCH_KEY")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert signing.default_key_path() == tmp_path / "cfg" / "metabench" / "signing_key.pem"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert signing.default_key_path() == (tmp_path / "home" / ".config" / "metabench"
                                          / "signing_key.pem")


def test_keys_init_writes_0600_and_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "secret" / "key.pem"
    assert cli.main(["keys", "init", "--path", str(path)]) == 0
    out = capsys.readouterr().out
    key = signing.load_private_key(path)
    assert out.splitlines()[0] == signing.public_key_text(key)
    assert str(path) in out and "leaderboard/keys/" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    before = path.read_bytes()
    assert cli.main(["keys", "init", "--path", str(path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert cli.main(["keys", "init", "--path", str(path), "--force"]) == 0
    assert path.read_bytes() != before and stat.S_IMODE(path.stat().st_mode) == 0o600
    capsys.readouterr()
    assert cli.main(["keys", "show", "--path", str(path)]) == 0
    assert capsys.readouterr().out.startswith(
        signing.public_key_text(signing.load_private_key(path)))


def test_keys_sign_changes_nothing_but_the_signature(tmp_path, capsys):
    key_path = tmp_path / "key.pem"
    key = signing.init_key(key_path)
    paths = []
    for i in range(2):
        rec = _record(seed=i)
        rec["verified"] = True  # the legacy flag goes
        paths.append(results.write(tmp_path / f"r{i}.json", rec))
    before = [p.read_text() for p in paths]
    assert cli.main(["keys", "sign", *map(str, paths), "--path", str(key_path)]) == 0
    keys = trust_test_key(tmp_path / "keys", key).parent
    for p, old in zip(paths, before):
        new = json.loads(p.read_text())
        assert signing.verify(new, signing.trusted_keys(keys)).verified
        old_rec = json.loads(old)
        del old_rec["verified"]
        assert {k: v for k, v in new.items() if k != "signature"} == old_rec
        # Byte for byte too: the file is the old one re-serialised the same way.
        assert old == json.dumps({**old_rec, "verified": True}, indent=1, sort_keys=True) + "\n"
        assert p.read_text() == json.dumps(new, indent=1, sort_keys=True) + "\n"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left over


def test_keys_sign_needs_a_key(tmp_path, capsys):
    path = results.write(tmp_path / "r.json", _record())
    before = path.read_bytes()
    assert cli.main(["keys", "sign", str(path), "--path", str(tmp_path / "none.pem")]) == 2
    assert "none.pem" in capsys.readouterr().err and path.read_bytes() == before


def test_the_sealer_signs_with_a_key_and_says_once_when_there_is_none(tmp_path, trusted):
    said: list[str] = []
    seal = store.sealer(tmp_path / "absent.pem", said.append)
    recs = [seal({**_record(), "verified": True}) for _ in range(2)]
    assert said == [f"no signing key at {tmp_path / 'absent.pem'}: the record is "
                    "self-reported (run `metabench keys init`)"]
    assert all("verified" not in r and "signature" not in r for r in recs)
    signing.init_key(tmp_path / "key.pem")
    rec = store.sealer(tmp_path / "key.pem", said.append)(_record())
    mine = signing.trusted_keys(trust_test_key(
        tmp_path / "mine", signing.load_private_key(tmp_path / "key.pem")).parent)
    assert signing.verify(rec, mine).verified and len(said) == 1
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(signing.KeyFileError, match="bad.pem"):
        store.sealer(tmp_path / "bad.pem", said.append)
