"""ipcctl's command line: its subcommands, their options, and how option values are read.

Only the subcommand a run names is built (see :func:`build_parser`): a cron job's
``ipcctl submit`` pays for its own options, not for all nine commands'.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ipcd.cli import parser as cli_parser
from ipcd.wire.protocol import MAX_EXPIRE, MAX_TIMEOUT, is_job_id

EPILOG = """exit status:
  0 success, 1 the job failed, 4 already queued (--unique: a job with that key waits or
  runs; its id is on stderr unless -q; nothing was queued), 5 not confirmed (submit: the
  daemon did not say it stored the job; it waits in the kernel queue), 64 usage error,
  65 bad payload (invalid --json, over [jobs] max_payload), 66 no such result or job
  (logs: no log file; cancel: a named job was not cancelled), 69 daemon or queue not
  there (status, stats: no daemon running; stats --prometheus exits 0 and prints
  ipcd_up 0; the store's commands: no control socket), 73 cannot write the --output
  file, 74 the job store cannot serve (read-only, corrupt or full), 75 not accepted:
  queue full, or every unique-key or spill slot taken, 77 permission denied,
  70 internal error (a bug: please report), 78 bad configuration (logs: no [log] file
  configured), 124 timed out waiting (pause --wait: jobs still run)
"""


#: How long --wait waits when --timeout does not say.
WAIT_TIMEOUT = 30.0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` a parser that knows just that subcommand: a
    cron job's ``ipcctl submit`` should not pay for building the other eight (a few
    milliseconds of argparse objects and translations)."""
    parser, sub, common = cli_parser(
        "ipcctl", "Submit jobs to ipcd and read their results.", EPILOG
    )
    for name, (help_text, fill) in _COMMANDS.items():
        if only is None or name == only:
            fill(sub.add_parser(name, help=help_text, description=help_text, parents=[common]))
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, checked: options that only make sense with another (--timeout
    with --wait, -q with --unique) are a usage error (64) without it, not silently ignored."""
    parser = build_parser(command_in(argv))
    args = parser.parse_args(argv)
    if getattr(args, "timeout", None) is not None and not getattr(args, "wait", True):
        parser.error("--timeout S only applies with --wait (it bounds the wait for the result)")
    if getattr(args, "quiet", False) and args.unique is None:
        parser.error("-q/--quiet only applies with --unique KEY (it silences 'already queued')")
    if args.command == "cancel":
        if bool(args.job_ids) == bool(args.type):
            parser.error("cancel takes job ids or --type H, not both and not neither")
        if args.state and not args.type:
            parser.error("--state S only applies with --type H (job ids name their jobs)")
    if args.command == "wait":
        from ipcd.wire.control import MAX_IDS

        if len(set(args.job_ids)) > MAX_IDS:
            parser.error(f"wait takes at most {MAX_IDS} job ids")
    return args


def command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names, if it names one before anything unexpected."""
    args = iter(argv)
    for arg in args:
        if arg in ("-c", "--config"):
            next(args, None)
        elif arg in _COMMANDS:
            return arg
        elif not (arg.startswith("--config=") or (arg.startswith("-c") and len(arg) > 2)):
            return None
    return None


def _submit_options(submit: argparse.ArgumentParser) -> None:
    submit.add_argument("type", help="handler name or message type number")
    submit.add_argument("payload", nargs="?", help="the payload text; - reads stdin")
    submit.add_argument("--json", action="store_true", help="parse the payload as JSON")
    _wait_options(submit)
    submit.add_argument(
        "--timeout-job",
        type=_job_timeout,
        metavar="S",
        help="kill the job if it runs longer than S seconds (default: the handler's timeout)",
    )
    submit.add_argument(
        "--delay",
        type=_positive_seconds,
        metavar="S",
        help="run the job no earlier than S seconds from now",
    )
    submit.add_argument(
        "--unique",
        metavar="KEY",
        help="queue nothing (exit 4) while a job with this key waits or runs (cron-safe)",
    )
    submit.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no stderr line when --unique finds the job already queued (exit 4 still)",
    )
    submit.add_argument(
        "--priority",
        type=_priority,
        default=0,
        metavar="N",
        help="-100 to 100: higher runs before other queued jobs of its handler (default 0)",
    )
    submit.add_argument(
        "--expire",
        type=_expire,
        metavar="S",
        help="cancel the job (reason: expired) if it has not started within S seconds",
    )
    submit.add_argument(
        "--after",
        type=_job_ids,
        action="extend",
        metavar="ID[,ID...]",
        help="hold the job until these jobs succeeded (at most 64, repeatable); cancelled "
        "if one fails",
    )
    submit.add_argument(
        "--no-confirm",
        action="store_true",
        help="return once the job is on the kernel queue, not once the daemon stored it",
    )
    submit.add_argument(
        "--send-timeout",
        type=_seconds,
        metavar="S",
        help="how long to wait while the queue is full (default: [ipc] send_timeout)",
    )


def _expire(text: str) -> float:
    """What the envelope's ``expire`` may carry (the daemon rejects more)."""
    value = _positive_seconds(text)
    if value > MAX_EXPIRE:
        raise argparse.ArgumentTypeError(f"seconds must be at most {MAX_EXPIRE:.0f} (a year)")
    return value


def _job_ids(text: str) -> tuple[str, ...]:
    """``--after``'s comma-separated job ids (checked by the client: exit 64)."""
    return tuple(part.strip() for part in text.split(",") if part.strip()) or (text,)


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not -100 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value} is outside -100..100")
    return value


def _result_options(result: argparse.ArgumentParser) -> None:
    _job_id_argument(result)
    _wait_options(result)
    result.add_argument("--json", action="store_true", help="print the whole result as JSON")
    result.add_argument(
        "--log",
        action="store_true",
        help="then print the job's log events (also when it failed or has no result)",
    )
    result.add_argument(
        "--output",
        action="store_true",
        help="print what the job wrote to stdout and stderr instead of its result",
    )
    _color_option(result)


def _status_options(status: argparse.ArgumentParser) -> None:
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch",
        type=_positive_seconds,
        nargs="?",
        const=1.0,
        metavar="S",
        help="refresh every S seconds (default 1) until Ctrl-C, like top",
    )


def _stats_options(stats: argparse.ArgumentParser) -> None:
    form = stats.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON document")
    form.add_argument(
        "--prometheus", action="store_true", help="the Prometheus text format; exits 0 when down"
    )
    stats.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE atomically (a temporary file renamed into place)",
    )


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON document")


def _job_id_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "job_id",
        type=_job_id,
        help="the job's id, as submit printed it (or as ipcctl failed lists it)",
    )


def _no_options(parser: argparse.ArgumentParser) -> None:
    pass


def _logs_options(logs: argparse.ArgumentParser) -> None:
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new events, across log rotations (like tail -F); Ctrl-C stops",
    )
    logs.add_argument(
        "-n",
        "--lines",
        metavar="N",
        help="only the last N matching events, or 'all' (default: all; 10 with -f)",
    )
    logs.add_argument(
        "--job",
        action="append",
        type=_job_id,
        metavar="ID",
        help="only this job's events (repeat for several)",
    )
    logs.add_argument(
        "--type",
        action="append",
        metavar="T",
        help="only events of this handler or type number (repeatable)",
    )
    logs.add_argument(
        "--level", metavar="L", help="only L and above (debug, info, warning, error, critical)"
    )
    logs.add_argument(
        "--since", metavar="TIME", help="only events since TIME: 30s, 10m, 2h, 1d or ISO-8601"
    )
    logs.add_argument(
        "--json", action="store_true", help="print the matching log lines as they are, for jq"
    )
    _color_option(logs)


def _list_options(parser: argparse.ArgumentParser) -> None:
    from ipcd.wire.control import MAX_LIMIT, STATES  # only the store's commands pay for it

    _state_option(parser, STATES, "only jobs in state S (repeatable)")
    _type_option(parser)
    parser.add_argument("--unique", metavar="KEY", help="only jobs submitted with this unique key")
    parser.add_argument(
        "-n",
        "--limit",
        type=_count(MAX_LIMIT),
        default=50,
        metavar="N",
        help="at most N jobs (default 50)",
    )
    _json_option(parser)


def _show_options(parser: argparse.ArgumentParser) -> None:
    _job_id_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="one JSON document: job, result and events"
    )
    _color_option(parser)


def _tail_options(parser: argparse.ArgumentParser) -> None:
    _job_id_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="JSON lines: each piece of output, then the end"
    )


def _cancel_options(parser: argparse.ArgumentParser) -> None:
    from ipcd.wire.control import WAITING

    parser.add_argument("job_ids", nargs="*", type=_job_id, metavar="ID", help="the jobs to cancel")
    _type_option(parser, "cancel the jobs of this handler or type number (repeatable)")
    _state_option(parser, WAITING, "with --type: only jobs in state S (default: both)")
    parser.add_argument(
        "--kill",
        action="store_true",
        help="also stop running jobs: kill their worker's process group; no retry",
    )
    _json_option(parser)


def _pause_options(parser: argparse.ArgumentParser) -> None:
    _handlers_argument(parser, "the handlers to pause (default: every handler)")
    _wait_options(parser, "then wait until no job of those handlers runs (a drain)")
    _json_option(parser)


def _resume_options(parser: argparse.ArgumentParser) -> None:
    _handlers_argument(parser, "the handlers to resume (default: lift every pause)")
    _json_option(parser)


def _purge_options(parser: argparse.ArgumentParser) -> None:
    from ipcd.wire.control import FINAL

    _state_option(parser, FINAL, "remove jobs in state S (repeatable; required)", required=True)
    parser.add_argument(
        "--older-than",
        type=duration,
        metavar="D",
        help="only jobs that finished more than D ago: 30s, 10m, 2h, 7d or seconds",
    )
    _json_option(parser)


def _wait_many_options(parser: argparse.ArgumentParser) -> None:
    from ipcd.wire.control import MAX_IDS

    parser.add_argument(
        "job_ids", nargs="+", type=_job_id, metavar="ID", help=f"the jobs (at most {MAX_IDS})"
    )
    parser.add_argument("--any", action="store_true", help="return when the first one ends")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="give up after S seconds, exit 124 (default: wait as long as it takes)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="at the end, one JSON document: the jobs' records, which ended, which still wait",
    )


def _handlers_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("handlers", nargs="*", metavar="HANDLER", help=help_text)


def _type_option(
    parser: argparse.ArgumentParser, help_text: str = "only jobs of this handler or type number"
) -> None:
    parser.add_argument("--type", action="append", metavar="H", help=help_text)


def _state_option(
    parser: argparse.ArgumentParser,
    states: tuple[str, ...],
    help_text: str,
    *,
    required: bool = False,
) -> None:
    parser.add_argument(
        "--state",
        action="append",
        choices=states,
        required=required,
        metavar="S",
        help=f"{help_text}: {', '.join(states)}",
    )


#: Every subcommand: its line in ``ipcctl --help``, and what adds its arguments.
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "submit": ("queue a job; prints its id (or its output with --wait)", _submit_options),
    "result": ("print a job's result", _result_options),
    "status": ("queue depth, result segment use, daemon, workers", _status_options),
    "stats": ("job counters and gauges (--prometheus for node_exporter)", _stats_options),
    "list": ("list the jobs in the store, newest first", _list_options),
    "show": ("print a job's whole record, its result and its log events", _show_options),
    "tail": ("follow what a job writes until it ends (exit 0: done, 1: not)", _tail_options),
    "cancel": ("cancel waiting jobs (--kill: running ones too)", _cancel_options),
    "pause": ("stop dispatching jobs of some handlers, or all", _pause_options),
    "resume": ("dispatch paused handlers' jobs again", _resume_options),
    "purge": ("remove finished jobs from the store", _purge_options),
    "failed": ("list jobs that failed for good, and why", _json_option),
    "retry": ("queue a failed or cancelled job again", _job_id_argument),
    "wait": ("wait until jobs end (--any: the first); one line per job", _wait_many_options),
    "schedules": ("list the recurring schedules: next run, last run and its job", _json_option),
    "key": ("print the IPC keys and how they are derived", _no_options),
    "logs": ("print ipcd's event log ([log] file) readably", _logs_options),
}


def _color_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the log events (default auto: on a terminal, unless NO_COLOR or TERM=dumb)",
    )


def _wait_options(
    parser: argparse.ArgumentParser, wait_help: str = "wait for the result and print it"
) -> None:
    parser.add_argument("--wait", action="store_true", help=wait_help)
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help=f"with --wait: give up after S seconds, exit 124 (default {WAIT_TIMEOUT:g})",
    )


def _job_id(text: str) -> str:
    """A job id as ipcd makes and accepts them: anything else is a typo (exit 64), not a
    job whose result is gone (66)."""
    if not is_job_id(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a job id (1 to 16 characters of 0-9, A-Z, a-z, _, . and -)"
        )
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("seconds must not be negative")
    if not value < float("inf"):  # inf and nan: no time at all
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


#: The units a duration may end with, in seconds.
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``--older-than``: ``30s``, ``10m``, ``2h``, ``7d`` or a plain number of seconds."""
    unit = _DURATION_UNITS.get(text[-1:], 0)
    try:
        return _seconds(text[:-1] if unit else text) * (unit or 1)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (30s, 10m, 2h, 7d or seconds)"
        ) from None


def _count(limit: int) -> Callable[[str], int]:
    """A number from 1 to ``limit`` (``-n``)."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"must be from 1 to {limit}")
        return value

    return count


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("seconds must be more than 0")
    return value


def _job_timeout(text: str) -> float:
    """What the envelope's ``timeout`` may carry (the daemon rejects more)."""
    value = _positive_seconds(text)
    if value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"seconds must be at most {MAX_TIMEOUT:.0e}")
    return value
