#!/usr/bin/env bash
# make compat: the capture, analyze, diagnostics, routing and log tests in two environments besides
# the locked .venv:
#   .venv-compat-newest  the newest release of every dependency (upper bounds of pyproject.toml lifted,
#                        torch kept at the pin of lock/constraints.in);
#   .venv-compat-oldest  the locked set with the oldest transformers that pyproject.toml admits.
# Usage: tools/compat.sh UV PYTHON "TORCH_SOURCE ARGS" TEST_PATH...
# The resolved versions of each environment are written to out/compat/<name>.txt.
set -euo pipefail
uv=$1 python=$2 torch_source=$3
shift 3
mkdir -p out/compat
status=0

# the project's dependencies by name only (no bounds), read from pyproject.toml
names=$("$python" - <<'PY'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = p["dependencies"] + p["optional-dependencies"]["dev"]
print(" ".join(re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in deps))
PY
)
oldest=$("$python" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in deps if d.startswith("transformers"))
print(re.search(r">=\s*([0-9][^,\s\"]*)", spec).group(1))
PY
)

run() {  # run NAME "COMPILE INPUT ARGS" TESTS...: build .venv-compat-NAME and run the tests there
    local name=$1 venv=.venv-compat-$1 input=$2
    shift 2
    echo "== compat: $name =="
    # shellcheck disable=SC2086
    "$uv" pip compile $input $torch_source --constraint lock/constraints.in \
        --python-version 3.11 --no-header -q -o out/compat/$name.txt
    [ -x $venv/bin/python ] || "$uv" venv -q --python "$python" $venv
    # shellcheck disable=SC2086
    "$uv" pip sync -q --python $venv/bin/python $torch_source out/compat/$name.txt
    # shellcheck disable=SC2086
    "$uv" pip install -q --python $venv/bin/python $torch_source --no-deps --no-build-isolation -e .
    grep -E '^(torch|transformers|numpy|scipy|highspy|pandas|safetensors)==' out/compat/$name.txt | tr '\n' ' '
    echo
    $venv/bin/python -m pytest -q -p no:cacheprovider -o addopts="-ra" "$@" || status=1
}

# shellcheck disable=SC2086
printf '%s\n' $names setuptools > out/compat/newest.in
rm -f out/compat/newest.txt  # no preferences: the newest of everything
run newest "out/compat/newest.in --upgrade" "$@"

# the locked versions are kept wherever the oldest transformers allows them (uv prefers the pins
# already in its output file)
echo "transformers==$oldest" > out/compat/oldest-constraint.txt
cp lock/requirements.txt out/compat/oldest.txt
run oldest "pyproject.toml --extra dev --constraint out/compat/oldest-constraint.txt" "$@"
exit $status
