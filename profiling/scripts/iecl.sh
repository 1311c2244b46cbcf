# Sourced by the GPU scripts: `iecl` as a shell function, with the profiling
# commands registered by hand. On the lent GPU machines `pip install -e .` fails
# (no package index for its build step), so the `iecl.commands` entry points that
# normally register `bench`, `profile` and `compare` are not there.
iecl() {
  python3 -c 'import sys; from train import cli; from profiling import cli as p
cli._plugin_commands = lambda: iter([p.register, p.register_profile, p.register_compare])
sys.exit(cli.main(sys.argv[1:]))' "$@"
}
