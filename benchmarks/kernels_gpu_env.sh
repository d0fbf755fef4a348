# Source on a GPU machine without the project installed: exposes splitserve.{kernels,core,benchmarks} via a shim
# package on PYTHONPATH (the GPU image lacks the project's other deps, which these scripts do not need).
S=/tmp/ss_shim/splitserve
mkdir -p "$S"
cp splitserve/__init__.py "$S/__init__.py"
for d in kernels core benchmarks; do ln -sfn "$PWD/$d" "$S/$d"; done
export PYTHONPATH=/tmp/ss_shim:$PYTHONPATH PYTHONUNBUFFERED=1
