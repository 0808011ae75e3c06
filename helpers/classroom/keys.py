"""Per-student API keys for a class server: made here, checked by the gateway, revoked any time.

    from helpers.classroom import keys
    made = keys.create_keys("class/keys.json", ["ana", "bo"], url="http://198.18.0.1:8080",
                            handout="class/handout.txt")     # {"ana": "sk-...", "bo": "sk-..."}
    keys.revoke("class/keys.json", "bo")      # bo's next request is refused, open streams cut
    keys.students("class/keys.json")          # who has a key, who was revoked, when

or from a shell: ``python -m helpers.classroom.keys create --url http://HOST:PORT --count 30``,
``... revoke bo``, ``... list``.

* **The keys file** (JSON, mode 0600) maps each student's name to the **sha256** of their key,
  never the key: whoever reads it (a backup, a screen share) cannot use it. The gateway re-reads
  it when it changes, so adding or revoking keys needs no restart. Every write replaces the file
  in one step (a new file renamed over it) under a lock, so the gateway never reads half of one.
* **The hand-out file** (mode 0600) is the only place a key is written in clear: one line per
  student, ready to paste into a shell on their laptop::

      TUTORIAL_SERVER_URL=http://198.18.0.1:8080 TUTORIAL_API_KEY=sk-... ./tutorial.sh lab   # ana

  Give each student their line and delete the file; a lost key is revoked and a new one made
  (``create_keys(..., replace=True)``).
* Keys are ``sk-`` plus 32 random bytes (``secrets.token_urlsafe``): letters, digits, ``-`` and
  ``_``, safe to paste anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from ..errors import KeysError
from ..paths import cache_dir, variable

FORMAT = "vllm-tutorial-classroom-keys/1"
KEY_PREFIX = "sk-"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEYS_VARIABLE = "TUTORIAL_GATEWAY_KEYS"          # where the gateway (and this module) find the file


def hash_key(key: str) -> str:
    """What the keys file stores for ``key``: its sha256, in hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def default_dir() -> Path:
    """``classroom/`` in the tutorial's cache folder (``~/.cache/vllm-tutorial/classroom``)."""
    return cache_dir() / "classroom"


def default_keys_path() -> Path:
    named = variable("GATEWAY_KEYS")
    return Path(named).expanduser() if named else default_dir() / "keys.json"


def default_handout_path() -> Path:
    return default_dir() / "handout.txt"


def handout_line(url: str, key: str, name: str) -> str:
    """One student's line: the server's URL and their key, as the tutorial's settings, with the
    light set-up (no vLLM, no torch) on the student's laptop."""
    return f"TUTORIAL_SERVER_URL={url} TUTORIAL_API_KEY={key} TUTORIAL_FLAVOR=client ./tutorial.sh lab   # {name}"


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class KeyTable:
    """The keys file as the gateway uses it: sha256 -> student name."""

    active: Mapping[str, str]
    revoked: Mapping[str, str]

    def student(self, key: str) -> str | None:
        """The student whose valid key this is, or None."""
        return self.active.get(hash_key(key))

    def revoked_student(self, key: str) -> str | None:
        return self.revoked.get(hash_key(key))


@dataclass(frozen=True)
class StudentKey:
    name: str
    status: str                 # "active" or "revoked"
    created: float
    revoked: float | None = None


def check_private(path: Path) -> os.stat_result:
    """``path``'s stat; ``KeysError`` when it is missing or others may read it."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeysError(f"the keys file {path} does not exist; make keys first: "
                        f"python -m helpers.classroom.keys create --keys {path} --url http://HOST:PORT "
                        f"--count 30") from None
    except OSError as err:
        raise KeysError(f"the keys file {path} cannot be read: {err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeysError(f"the keys file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise KeysError(f"the keys file {path} may be read by other users (mode "
                        f"{stat.filemode(info.st_mode)}); run: chmod 600 {path}")
    return info


def _empty() -> dict:
    return {"format": FORMAT, "students": {}, "revoked": []}


def read_document(path: Path | str) -> dict:
    path = Path(path)
    check_private(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise KeysError(f"the keys file {path} is not valid JSON ({err}); fix it or make a new one") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeysError(f"the keys file {path} is not a keys file of this tutorial (no "
                        f"\"format\": \"{FORMAT}\")")
    students, revoked = doc.get("students"), doc.get("revoked", [])
    if not isinstance(students, dict) or not isinstance(revoked, list):
        raise KeysError(f"the keys file {path} is damaged: 'students' must be an object and "
                        f"'revoked' a list")
    for name, entry in students.items():
        if not isinstance(entry, dict) or not _is_hash(entry.get("sha256")):
            raise KeysError(f"the keys file {path} is damaged: student {name!r} has no sha256 of 64 hex digits")
    for entry in revoked:
        if not isinstance(entry, dict) or not _is_hash(entry.get("sha256")):
            raise KeysError(f"the keys file {path} is damaged: a revoked entry has no sha256")
    return doc


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def read_table(path: Path | str) -> KeyTable:
    """The keys file, checked: private (mode 0600), valid, of this format."""
    doc = read_document(path)
    active = {entry["sha256"]: name for name, entry in doc["students"].items()}
    revoked = {entry["sha256"]: entry.get("name", "?") for entry in doc["revoked"]}
    return KeyTable(active, revoked)


def students(path: Path | str | None = None) -> list[StudentKey]:
    """Every student with a key, then every revoked key, oldest first."""
    doc = read_document(Path(path) if path else default_keys_path())
    rows = [StudentKey(name, "active", entry.get("created", 0.0)) for name, entry in doc["students"].items()]
    rows += [StudentKey(entry.get("name", "?"), "revoked", entry.get("created", 0.0), entry.get("revoked"))
             for entry in doc["revoked"]]
    return sorted(rows, key=lambda r: (r.status, r.created, r.name))


# --------------------------------------------------------------------------- writing
@contextlib.contextmanager
def _editing(path: Path) -> Iterator[dict]:
    """The document, under an exclusive lock; written back (atomically, 0600) on success."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        doc = read_document(path) if path.exists() else _empty()
        yield doc
        _write_private(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    finally:
        os.close(fd)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise KeysError(f"{name!r} is not a usable student name: 1 to 64 letters, digits, '.', '_' or '-', "
                        f"starting with a letter or digit")
    return name


def create_keys(path: Path | str | None = None, names: Iterable[str] | None = None, *,
                count: int | None = None, prefix: str = "student", url: str | None = None,
                handout: Path | str | None = None, replace: bool = False) -> dict[str, str]:
    """Make a key for each of ``names`` (or ``count`` students named ``prefix01`` ...), record
    their sha256 in the keys file, and append each student's line to ``handout`` when ``url``
    is given. Returns ``{name: key}``: the only time the keys exist outside the hand-out.

    A name that already has a key is refused, unless ``replace`` (its old key is revoked).
    """
    path = Path(path) if path else default_keys_path()
    if names is None and (not count or count < 1):
        raise KeysError("give the students' names, or count= (how many keys to make)")
    wanted = [_check_name(n) for n in names] if names is not None else None
    if wanted is not None and len(set(wanted)) != len(wanted):
        raise KeysError(f"a name is given twice: {sorted(n for n in set(wanted) if wanted.count(n) > 1)}")
    made: dict[str, str] = {}
    now = time.time()
    with _editing(path) as doc:
        roster = doc["students"]
        if wanted is None:
            wanted, number = [], 1
            while len(wanted) < count:
                name = f"{prefix}{number:02d}"
                if name not in roster:
                    wanted.append(_check_name(name))
                number += 1
        taken = [n for n in wanted if n in roster]
        if taken and not replace:
            raise KeysError(f"already have a key: {', '.join(taken)}; revoke it first, or pass replace=True "
                            f"(--replace) to revoke the old key and make a new one")
        for name in wanted:
            if name in roster:
                old = roster.pop(name)
                doc["revoked"].append({"name": name, "sha256": old["sha256"], "created": old.get("created"),
                                       "revoked": now})
            key = new_key()
            roster[name] = {"sha256": hash_key(key), "created": now}
            made[name] = key
    if url:
        write_handout(Path(handout) if handout else default_handout_path(), url, made)
    return made


def write_handout(path: Path, url: str, made: Mapping[str, str]) -> Path:
    """Append one line per student to ``path`` (created with mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        for name, key in made.items():
            f.write(handout_line(url, key, name) + "\n")
    return path


def revoke(path: Path | str | None, name: str) -> None:
    """Revoke ``name``'s key: the gateway refuses its next request (401) and ends its open
    streams within about a second of noticing the file changed."""
    path = Path(path) if path else default_keys_path()
    with _editing(path) as doc:
        entry = doc["students"].pop(name, None)
        if entry is None:
            revoked = any(e.get("name") == name for e in doc["revoked"])
            raise KeysError(f"{name!r} has no active key" + (" (it was revoked already)" if revoked else
                                                               f"; students: {', '.join(sorted(doc['students'])) or 'none'}"))
        doc["revoked"].append({"name": name, "sha256": entry["sha256"], "created": entry.get("created"),
                               "revoked": time.time()})


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.classroom.keys",
                                     description="Make, revoke and list the students' API keys.")
    parser.add_argument("--keys", type=Path, default=None,
                        help=f"the keys file (default: ${KEYS_VARIABLE} or {default_dir()}/keys.json)")
    sub = parser.add_subparsers(dest="action", required=True)
    make = sub.add_parser("create", help="make keys and write the hand-out lines")
    make.add_argument("--url", required=True, help="the gateway's URL as students reach it, http://HOST:PORT")
    make.add_argument("--names", nargs="+", help="the students' names")
    make.add_argument("--count", type=int, help="or: how many keys (named student01, student02 ...)")
    make.add_argument("--handout", type=Path, default=None, help=f"default: {default_handout_path()}")
    make.add_argument("--replace", action="store_true", help="revoke a name's old key and make a new one")
    gone = sub.add_parser("revoke", help="revoke students' keys")
    gone.add_argument("names", nargs="+")
    sub.add_parser("list", help="who has a key")
    args = parser.parse_args(argv)
    path = args.keys or default_keys_path()
    try:
        if args.action == "create":
            handout = args.handout or default_handout_path()
            made = create_keys(path, args.names, count=args.count, url=args.url, handout=handout,
                               replace=args.replace)
            print(f"made {len(made)} key(s) in {path}; each student's line is in {handout} "
                  f"(give each their line, then delete the file)")
        elif args.action == "revoke":
            for name in args.names:
                revoke(path, name)
                print(f"revoked {name}")
        else:
            for row in students(path):
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.revoked or row.created))
                print(f"{row.name:<24} {row.status:<8} {when}")
    except KeysError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
