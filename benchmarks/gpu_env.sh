# Source from the repo root on a GPU machine (every GPU script in benchmarks/ runs this way) where the project is not pip-installed (no package index there):
# unpacks the dependency bundle built by ../shared/tools/device-deps.sh (.deps/, carried) and exposes the
# whole `splitserve` namespace through a shim package on PYTHONPATH, the way `pip install -e .` maps it.
set -e
if [ -f .deps/pydeps-py312.tar.gz ] && [ ! -d /tmp/pydeps ]; then tar -C /tmp -xzf .deps/pydeps-py312.tar.gz; fi
S=/tmp/ss_full/splitserve
rm -rf /tmp/ss_full && mkdir -p "$S"
for f in splitserve/*.py; do ln -sfn "$PWD/$f" "$S/$(basename "$f")"; done
for d in core prefill decode transfer router kernels benchmarks; do ln -sfn "$PWD/$d" "$S/$d"; done
# .deps/extra (optional): unpacked pure-Python wheels the bundle lacks (e.g. jsonschema for the router's schema checks)
EXTRA=""; if [ -d .deps/extra ]; then EXTRA="$PWD/.deps/extra:"; fi
# .deps/xgr (optional): xgrammar + apache-tvm-ffi cp312 wheels (structured output), installed once per machine into
# /tmp/xgr with no index (the machine has none); a failed install is reported and the rest still runs
if ls .deps/xgr/*.whl >/dev/null 2>&1 && [ ! -d /tmp/xgr/xgrammar ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/xgr .deps/xgr/*.whl \
    || echo "gpu_env.sh: installing xgrammar from .deps/xgr failed; structured output will not load" >&2
fi
if [ -d /tmp/xgr/xgrammar ]; then EXTRA="$EXTRA/tmp/xgr:"; fi
export PYTHONPATH=/tmp/ss_full:/tmp/pydeps:$EXTRA$PYTHONPATH PYTHONUNBUFFERED=1 UCX_WARN_UNUSED_ENV_VARS=n
# Run python from outside the checkout: `python -m` puts the working directory first on sys.path, where the
# bare splitserve/ folder would shadow the shim.
export SPLITSERVE_REPO=$PWD
export UCX_TLS=${UCX_TLS:-tcp,cuda_copy,cuda_ipc,sm,self}
set +e
