"""Start and supervise the whole system (buffer, actors, learner) in one command.

Placeholder until the run issue lands: it only resolves and prints the configuration.
Run: `python run_async.py [--preset tiny|cpu-demo|gpu-cluster] [--section.field VALUE ...]`.
"""

import json

from common.config import config_to_dict, parse_cli


def main() -> None:
    cfg = parse_cli(description=__doc__)
    print(json.dumps(config_to_dict(cfg), indent=2))
    print("run_async.py is a placeholder: the buffer, actor and learner roles are not wired up yet.")


if __name__ == "__main__":
    main()
