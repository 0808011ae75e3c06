"""helpers/classroom/keys.py: making, revoking and listing students' keys; the files it writes."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

from helpers.classroom import keys as keyfile
from helpers.errors import TutorialError


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keys_file_holds_only_hashes_and_the_handout_holds_one_pasteable_line_each(tmp_path):
    path, handout = tmp_path / "class" / "keys.json", tmp_path / "class" / "handout.txt"
    made = keyfile.create_keys(path, ["ana", "bo"], url="http://198.18.0.1:8080", handout=handout)
    assert set(made) == {"ana", "bo"} and len(set(made.values())) == 2
    for key in made.values():
        assert key.startswith("sk-") and len(key) >= 40
        assert set(key[3:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    text = path.read_text()
    assert not any(key in text for key in made.values())
    doc = json.loads(text)
    assert doc["students"]["ana"]["sha256"] == keyfile.hash_key(made["ana"])
    assert mode(path) == 0o600 and mode(handout) == 0o600 and mode(path.parent) == 0o700
    lines = handout.read_text().splitlines()
    assert lines == [keyfile.handout_line("http://198.18.0.1:8080", made[n], n) for n in ("ana", "bo")]
    words = shlex.split(lines[0], comments=True)              # what a shell makes of the pasted line
    assert words == ["TUTORIAL_SERVER_URL=http://198.18.0.1:8080", f"TUTORIAL_API_KEY={made['ana']}",
                     "TUTORIAL_FLAVOR=client", "./tutorial.sh", "lab"]
    table = keyfile.read_table(path)
    assert table.student(made["bo"]) == "bo" and table.student("sk-other") is None


def test_count_names_students_in_order_and_more_can_be_added(tmp_path):
    path = tmp_path / "keys.json"
    first = keyfile.create_keys(path, count=3)
    assert list(first) == ["student01", "student02", "student03"]
    more = keyfile.create_keys(path, count=2)
    assert list(more) == ["student04", "student05"]
    assert [s.name for s in keyfile.students(path)] == [f"student0{i}" for i in range(1, 6)]


def test_revoke_keeps_the_hash_so_the_gateway_can_say_revoked(tmp_path):
    path = tmp_path / "keys.json"
    made = keyfile.create_keys(path, ["ana", "bo"])
    keyfile.revoke(path, "bo")
    table = keyfile.read_table(path)
    assert table.student(made["bo"]) is None and table.revoked_student(made["bo"]) == "bo"
    assert [(s.name, s.status) for s in keyfile.students(path)] == [("ana", "active"), ("bo", "revoked")]
    with pytest.raises(keyfile.KeysError, match="revoked already"):
        keyfile.revoke(path, "bo")
    with pytest.raises(keyfile.KeysError, match="no active key.*students: ana"):
        keyfile.revoke(path, "zed")


def test_a_name_with_a_key_is_refused_unless_replaced(tmp_path):
    path = tmp_path / "keys.json"
    old = keyfile.create_keys(path, ["ana"])["ana"]
    with pytest.raises(keyfile.KeysError, match="already have a key: ana"):
        keyfile.create_keys(path, ["ana"])
    new = keyfile.create_keys(path, ["ana"], replace=True)["ana"]
    table = keyfile.read_table(path)
    assert table.student(new) == "ana" and table.student(old) is None and table.revoked_student(old) == "ana"


@pytest.mark.parametrize("name", ["", "a b", "-x", "ana;rm", "ana\n", "ü", "x" * 65, "../x"])
def test_names_that_would_break_a_line_or_a_log_are_refused(tmp_path, name):
    with pytest.raises(keyfile.KeysError, match="not a usable student name"):
        keyfile.create_keys(tmp_path / "keys.json", [name])
    assert not (tmp_path / "keys.json").exists()


def test_unusable_keys_files_are_named_with_what_to_do(tmp_path):
    path = tmp_path / "keys.json"
    with pytest.raises(keyfile.KeysError, match="does not exist; make keys first"):
        keyfile.read_table(path)
    keyfile.create_keys(path, ["ana"])
    os.chmod(path, 0o640)
    with pytest.raises(keyfile.KeysError, match="chmod 600"):
        keyfile.read_table(path)
    for text, match in [("{", "not valid JSON"), ("[]", "not a keys file"),
                        ('{"format": "%s", "students": {"a": {"sha256": "xyz"}}}' % keyfile.FORMAT, "damaged")]:
        path.write_text(text)
        os.chmod(path, 0o600)
        with pytest.raises(keyfile.KeysError, match=match):
            keyfile.read_table(path)
    assert issubclass(keyfile.KeysError, TutorialError)


def test_command_line_create_revoke_list(tmp_path):
    path, handout = tmp_path / "keys.json", tmp_path / "handout.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "helpers.classroom.keys", "--keys", str(path), *args],
                              capture_output=True, text=True, timeout=60, env=env)
    made = run("create", "--url", "http://198.18.0.1:8080", "--names", "ana", "bo", "--handout", str(handout))
    assert made.returncode == 0, made.stderr
    assert "made 2 key(s)" in made.stdout and "sk-" not in made.stdout      # keys go to the hand-out only
    assert len(handout.read_text().splitlines()) == 2
    assert run("revoke", "bo").returncode == 0
    listed = run("list")
    assert listed.returncode == 0 and "ana" in listed.stdout and "revoked" in listed.stdout
    again = run("revoke", "bo")
    assert again.returncode == 2 and "revoked already" in again.stderr
