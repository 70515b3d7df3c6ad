#!/usr/bin/env bash
# SGLang 0.5.23's GDN attention kit with gdn_backend selected, on the GPU machine
# (all of integration_tests/test_sglang_kit.py; the table lands in $OUT/sglang_kit.md).
#
# On the CPU machine, once:      bash integration_tests/sglang_kit_gpu.sh prepare
#   builds .gpusgl/ (SGLang's Python, ../shared/gpu/prepare-sglang.sh) and .gpunew1-3/
#   (cutlass-dsl 4.8.1, ../shared/gpu/prepare-newest.sh), all git-ignored.
# On the GPU machine, calls made back to back on one warm machine, each carrying one folder:
#   bash .gpunew1/stage.sh                        carry [".gpunew1"]
#   bash .gpunew2/stage.sh                        carry [".gpunew2"]
#   bash .gpunew3/stage.sh                        carry [".gpunew3"]
#   bash integration_tests/sglang_kit_gpu.sh run  carry [".gpusgl"] (later calls: nothing)
# Extra pytest arguments follow `run` (-k chain_verify, say).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    bash ../shared/gpu/prepare-sglang.sh
    bash ../shared/gpu/prepare-newest.sh
    ;;
run)
    shift
    source /tmp/gpunew/env.sh
    if [ -d .gpusgl ]; then source .gpusgl/env.sh; else source /tmp/gpusgl/env.sh; fi
    # gdn_backend's entry points as pip would install them, so that SGLang's own plugin
    # loader finds and registers it.
    dist=/tmp/gdn-dist
    python3 - "$dist" <<'PY'
import pathlib, sys, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path(sys.argv[1]) / f"gdn_backend-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: gdn-backend\nVersion: {project['version']}\n")
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in eps.items())
    for group, eps in project["entry-points"].items()))
PY
    export PYTHONPATH="$dist:$PYTHONPATH"
    report=${OUT:-sglang-kit-report}
    mkdir -p "$report"
    status=0
    GDN_KIT_REPORT="$report" python3 -m pytest -q -p no:cacheprovider \
        integration_tests/test_sglang_kit.py "$@" 2>&1 | tee "$report/sglang_kit.log" || status=$?
    [ ! -f "$report/sglang_kit.md" ] || cat "$report/sglang_kit.md"
    exit "$status"
    ;;
*)
    echo "usage: $0 prepare | run [pytest args]" >&2
    exit 2
    ;;
esac
