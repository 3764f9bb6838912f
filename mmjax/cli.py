"""Flag parsing shared by mmjax's command-line entry points (`app.run(main, flags_parser=cli.parse_flags)`).

Config mistakes end the program with one line naming the field or file, not a traceback.
"""

import sys

from absl import flags


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def parse_flags(argv):
  try:
    remaining = flags.FLAGS(argv)
  except SystemExit:
    # absl prints the help text and exits 1; asking for help is not a failure.
    if any(arg in HELP_FLAGS for arg in argv[1:]):
      sys.exit(0)
    raise
  except (AttributeError, KeyError) as e:
    _exit_bad_override(argv, e)
  except flags.Error as e:
    sys.exit(f"mmjax: error: {e}")
  try:
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config.get("trainer")  # a config file that failed to load raises here
    return remaining
  except IOError as e:
    cause = " ".join(str(e.__cause__ or e).split())
    sys.exit(f"mmjax: error: {flags.FLAGS['config'].serialize()}: {cause}")


def _exit_bad_override(argv, error):
  overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  reason = str(error.args[0] if error.args else error).replace("\n", " ").replace("'", "")
  sys.exit(f"mmjax: error: config has no field named by {' '.join(overrides)} ({reason})")
