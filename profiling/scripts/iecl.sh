# Sourced by the GPU scripts: `iecl` as a shell function that runs this source
# checkout with no installation (`python3 CHECKOUT ARGS` is `iecl ARGS`), for
# machines with no package index where `pip install -e .` cannot run.
IECL_CHECKOUT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
iecl() {
  python3 "$IECL_CHECKOUT" "$@"
}
