#!/bin/bash
# The test suite on a GPU machine without a package index (the device tool's machine), after the
# vLLM bundle of ../shared/gpu/README.md is unpacked into /tmp/site.
#
#   bash benchmarks/gpu_suite.sh SUITE_DIR [STAGE...]
#
# SUITE_DIR holds wh/ (the test set's wheels for Python 3.12: pytest, nbval, ipykernel, ...;
# made with `pip download --only-binary=:all: --python-version 3.12 -r ...`) and smollm2/ (the
# embedded model's config.json, tokenizer and chat template, no weights: this script writes random
# weights of that shape with transformers, so every server a lesson starts by hand loads them as it
# would real ones; answers are noise, so only --nbval-lax fits).
# Stages (each within one device call of 600 s; the machine keeps /tmp between warm calls):
#   unit       every test not marked vllm
#   notebooks  02-04 on the shared server, and the build's own checks
#   lessons-a  notebooks 00-05          lessons-b  notebooks 06-09
#   rest       notebooks 00, 01, 05, 06 (those the stages above leave out, with 06 again)
#   rest-a     notebooks 00, 01         rest-b     notebooks 05, 06   (rest in two calls)
#   solutions  the exercises' solutions
#   server     the tests marked vllm, except the browser and network-namespace ones
#   failures   the two server tests that failed in run 4, alone (their reasons were cut off)
#   schema     the first of them alone (about 3 min: the shared server's start, then the test)
#   server-b   the server tests that run 4 did not reach (after the first 14 by collection order)
#   changed    the two server tests changed after run 6 (the class server started twice; the engine
#              core that dies while its API server lives), alone
#   n00..n09   one notebook alone (n05, n08: each starts servers by hand since run 7)
#   sol00..sol09  one solution notebook alone
#              solution 09 needs vllm-router: carry .gpu/router (its wheel, orjson,
#              setproctitle) in a call of its own first: bash /tmp/stash/unpack.sh .gpu/router
# JUnit files and logs go to $OUT.
set -u
suite=${1:?usage: gpu_suite.sh SUITE_DIR [unit] [notebooks] [lessons-a] [lessons-b] [rest] [solutions] [server]}
shift
stages=${*:-unit notebooks}
out=${OUT:-/tmp/gpu-suite-out}
mkdir -p "$out" /tmp/suite-site
[ -d /tmp/suite-site/pytest ] || for w in "$suite"/wh/*.whl; do python3 -m zipfile -e "$w" /tmp/suite-site; done
# vllm-router, where its wheels were stashed: notebook 09 and its solution start the launcher found
# beside sys.executable, so it is written there (the machine's own interpreter: a link to it from
# elsewhere would lose its virtual environment, as run 5 found: no httpx, no click)
py=$(python3 -c 'import sys; print(sys.executable)')
if compgen -G "/tmp/stash/vllm_router-*.whl" > /dev/null && [ ! -x "$(dirname "$py")/vllm-router" ]; then
  for w in /tmp/stash/*.whl; do python3 -m zipfile -e "$w" /tmp/suite-site; done
  printf '#!%s\nimport sys\nfrom vllm_router.launch_router import main\nsys.exit(main())\n' \
    "$py" > "$(dirname "$py")/vllm-router" && chmod +x "$(dirname "$py")/vllm-router"
fi
export PYTHONPATH=/tmp/site:/tmp/suite-site:$PWD
export PATH=$PATH:/tmp/site/bin
model=/tmp/smollm2-random
if [ ! -f "$model/model.safetensors" ]; then
  rm -rf "$model" && cp -r "$suite/smollm2" "$model"
  python3 - "$model" <<'EOF'
import sys, torch, transformers
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(sys.argv[1])
EOF
fi
export TUTORIAL_MODEL=$model TUTORIAL_SERVED_MODEL_NAME=smollm2-135m-instruct TUTORIAL_MAX_MODEL_LEN=2048
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader | tee "$out/device.txt"
python3 - <<'EOF' | tee -a "$out/device.txt"
import importlib.metadata as m, platform
from helpers.server import builds
print("python", platform.python_version(), "| build:", builds.installed().name)
for name in ("vllm", "torch", "nvidia-nccl-cu13", "transformers", "openai"):
    try:
        print(f"{name:18} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name:18} not installed")
EOF
opts=(-o addopts= -p no:cacheprovider -q -rfEs --durations=10)
run() {  # run STAGE SECONDS PYTEST-ARGS...: pytest within a time limit; its log and JUnit file go to $out
  local stage=$1 limit=$2
  shift 2
  # SIGINT at the limit: pytest then stops as on Ctrl-C and still writes its summary and JUnit file
  # (run 4's server stage, killed by SIGTERM, left neither); SIGKILL 30 s later if it does not end
  timeout -s INT -k 30 "$limit" python3 -m pytest "${opts[@]}" "$@" --junitxml="$out/$stage.xml" > "$out/$stage.log" 2>&1
  echo "$stage: exit $?; $(tail -1 "$out/$stage.log")"
}
lax=(--nbval-lax --nbval-current-env)
for stage in $stages; do
  case $stage in
    unit) run unit 150 -n 8 -m "not vllm" tests ;;
    notebooks) run notebooks 370 "${lax[@]}" --nbval-cell-timeout 300 tests/server/test_builds.py \
                 notebooks/02_list_models.ipynb notebooks/03_stream_requests.ipynb notebooks/04_stream_openai.ipynb ;;
    lessons-a) run lessons-a 530 "${lax[@]}" --nbval-cell-timeout 400 notebooks/0[0-5]_*.ipynb ;;
    lessons-b) run lessons-b 530 "${lax[@]}" --nbval-cell-timeout 400 notebooks/0[6-9]_*.ipynb ;;
    rest) run rest 500 "${lax[@]}" --nbval-cell-timeout 400 notebooks/0[0156]_*.ipynb ;;
    rest-a) run rest-a 530 "${lax[@]}" --nbval-cell-timeout 400 notebooks/0[01]_*.ipynb ;;
    rest-b) run rest-b 530 "${lax[@]}" --nbval-cell-timeout 400 notebooks/0[56]_*.ipynb ;;
    changed) run changed 450 -m vllm \
      "tests/server/test_lifecycle.py::test_a_class_server_started_twice_at_once_is_one_server_with_its_key_off_every_command_line" \
      "tests/server/test_lifecycle.py::test_a_start_whose_engine_dies_while_the_api_server_lives_fails_within_10_s" ;;
    n0[0-9]) run "$stage" 450 "${lax[@]}" --nbval-cell-timeout 400 notebooks/"${stage#n}"_*.ipynb ;;
    sol0[0-9]) run "$stage" 300 "${lax[@]}" --nbval-cell-timeout 250 notebooks/solutions/"${stage#sol}"_*.ipynb ;;
    solutions) run solutions 530 "${lax[@]}" --nbval-cell-timeout 400 notebooks/solutions/*.ipynb ;;
    server) run server 530 -m "vllm and not browser and not netns" tests ;;
    failures) run failures 400 -m vllm \
      "tests/classroom/test_gateway_vllm.py::test_structured_outputs_the_engine_would_compile_for_long_are_refused_and_small_ones_answered" \
      "tests/server/test_lifecycle.py::test_a_class_server_started_twice_at_once_is_one_server_with_its_key_off_every_command_line" ;;
    schema) run schema 300 -m vllm \
      "tests/classroom/test_gateway_vllm.py::test_structured_outputs_the_engine_would_compile_for_long_are_refused_and_small_ones_answered" ;;
    server-b) run server-b 530 -m "vllm and not browser and not netns" \
      "tests/server/test_lifecycle.py::test_a_kernel_killed_while_the_engine_starts_leaves_nothing_after_5_s" \
      "tests/server/test_lifecycle.py::test_a_start_whose_engine_dies_while_the_api_server_lives_fails_within_10_s" \
      tests/stream tests/test_loadtest.py tests/test_parallel_bench.py tests/test_prometheus.py ;;
  esac
done
# `timeout` signals pytest alone: end any server it left (the pattern cannot match this line).
pkill -9 -f '[v]llm.entrypoints' ; pkill -9 -f '[V]LLM::' ; true
