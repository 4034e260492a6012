# Source on a machine where flashrt is not pip-installed (the lent GPU): maps the top-level folders into a
# `flashrt` package on PYTHONPATH, as pyproject's package-dir does for an install.
site=$(mktemp -d /tmp/flashrt-site.XXXX)
mkdir -p "$site/flashrt"
cp flashrt/*.py "$site/flashrt/"
for d in aot kernels engine_format runtime cli; do ln -s "$PWD/$d" "$site/flashrt/$d"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
