"""Flag parsing shared by mmjax's command-line entry points (`app.run(main, flags_parser=cli.parse_flags)`).

Config mistakes end the program with one line naming the field or file, not a traceback.
"""

import sys

from absl import flags


def parse_flags(argv):
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config.get("trainer")  # a config file that failed to load raises here
    return remaining
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    reason = str(e.args[0] if e.args else e).replace("\n", " ").replace("'", "")
    sys.exit(f"mmjax: error: config has no field named by {' '.join(overrides)} ({reason})")
  except IOError as e:
    cause = " ".join(str(e.__cause__ or e).split())
    sys.exit(f"mmjax: error: {flags.FLAGS['config'].serialize()}: {cause}")
  except flags.Error as e:
    sys.exit(f"mmjax: error: {e}")
