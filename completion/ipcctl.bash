# bash completion for ipcctl and ipcd                          -*- shell-script -*-
#
# Installed as $(PREFIX)/share/bash-completion/completions/ipcctl, with a link named ipcd,
# where bash-completion loads it the first time either command is completed. It can also
# be sourced on its own: it needs nothing from bash-completion.
#
# Completes subcommands, each subcommand's options, the values of --level, --color and
# --state, file names after -c/--config and stats -o/--output (also --config=FILE as one
# word), handler names after `submit`, `pause`, `resume` and `--type` (read from the
# [handlers.NAME] table headers of the configuration that -c, $IPCD_CONFIG or
# /etc/ipcd/ipcd.toml names, with sed: starting Python on every Tab would be slow), and
# the ids of failed jobs after `retry` (from `ipcctl failed`).
# tests/test_completion.py checks that every command and option of the two argparse
# parsers is offered here.

# The configuration file the command line being completed would use.
_ipcd_config_file() {
    local i cfg=${IPCD_CONFIG:-/etc/ipcd/ipcd.toml}
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
        -c | --config)
            if [[ ${COMP_WORDS[i + 1]} == "=" ]]; then
                cfg=${COMP_WORDS[i + 2]}
            else
                cfg=${COMP_WORDS[i + 1]}
            fi
            ;;
        --config=?*) cfg=${COMP_WORDS[i]#--config=} ;; # one word: "=" not a word break
        esac
    done
    printf '%s\n' "${cfg/#\~/$HOME}"
}

# Handler names: the NAME of every [handlers.NAME] (or [handlers."NAME"]) table header.
_ipcd_handler_names() {
    local cfg
    cfg=$(_ipcd_config_file)
    [[ -r $cfg ]] || return 0
    sed -nE 's/^[[:space:]]*\[[[:space:]]*handlers\.("?)([A-Za-z0-9_-]+)\1[[:space:]]*\].*/\2/p' \
        "$cfg" 2>/dev/null
}

# The words of the command line before the cursor that pass -c/--config on.
_ipcd_config_args() {
    local i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
        -c | --config)
            if [[ ${COMP_WORDS[i + 1]} == "=" ]]; then
                printf '%s\n' --config "${COMP_WORDS[i + 2]}"
            else
                printf '%s\n' --config "${COMP_WORDS[i + 1]}"
            fi
            ;;
        --config=?*) printf '%s\n' "${COMP_WORDS[i]}" ;;
        esac
    done
}

# The subcommand: the first word after the command that is neither an option nor the
# value of -c/--config. Sets _ipcd_sub (empty when there is none before the cursor).
_ipcd_find_subcommand() {
    local i word
    _ipcd_sub=
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        case $word in
        -c | --config)
            [[ ${COMP_WORDS[i + 1]} == "=" ]] && ((i++))
            ((i++))
            ;;
        -*) ;;
        *)
            _ipcd_sub=$word
            return 0
            ;;
        esac
    done
}

# How many positional arguments precede the cursor after the subcommand.
_ipcd_count_positionals() { # $1 = options of the subcommand that take a value
    local i seen=0 word found=0 takes=" $1 "
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if ((!found)); then
            case $word in
            -c | --config)
                [[ ${COMP_WORDS[i + 1]} == "=" ]] && ((i++))
                ((i++))
                ;;
            -*) ;;
            *) found=1 ;;
            esac
            continue
        fi
        case $word in
        -) ((seen++)) ;; # the payload "-" (stdin)
        -*) [[ $takes == *" $word "* ]] && ((i++)) ;;
        *) ((seen++)) ;;
        esac
    done
    printf '%s\n' "$seen"
}

_ipcd_reply() { # $1 = words to offer
    local IFS=$'\n'
    # shellcheck disable=SC2207  # words hold no spaces; compgen does the matching
    COMPREPLY=($(IFS=$' \t\n' compgen -W "$1" -- "$cur"))
}

_ipcd_reply_files() {
    compopt -o filenames 2>/dev/null
    local IFS=$'\n'
    # shellcheck disable=SC2207
    COMPREPLY=($(compgen -f -- "${cur/#\~/$HOME}"))
}

_ipcctl() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    COMPREPLY=()
    # COMP_WORDBREAKS splits --opt=value into three words: "--opt" "=" "value".
    if [[ $cur == "=" ]]; then
        cur=
    elif [[ $prev == "=" ]] && ((COMP_CWORD >= 2)); then
        prev=${COMP_WORDS[COMP_CWORD - 2]}
    fi
    case $cur in
    --config=* | --output=*) # one word when COMP_WORDBREAKS lacks "="
        local opt=${cur%%=*}
        cur=${cur#*=}
        _ipcd_reply_files
        COMPREPLY=("${COMPREPLY[@]/#/$opt=}")
        return 0
        ;;
    esac
    case $prev in
    -c | --config | -o | --output)
        _ipcd_reply_files
        return 0
        ;;
    --level)
        _ipcd_reply "debug info warning error critical"
        return 0
        ;;
    --color)
        _ipcd_reply "auto always never"
        return 0
        ;;
    --type)
        _ipcd_reply "$(_ipcd_handler_names)"
        return 0
        ;;
    --state)
        local _ipcd_sub
        _ipcd_find_subcommand
        case $_ipcd_sub in
        cancel) _ipcd_reply "queued scheduled" ;;
        purge) _ipcd_reply "done failed cancelled" ;;
        *) _ipcd_reply "queued scheduled running done failed cancelled" ;;
        esac
        return 0
        ;;
    --timeout | --timeout-job | --delay | --send-timeout | --unique | --priority | --expire | --after | --job | --since | \
        -n | --lines | --watch | --limit | --older-than)
        return 0 # a value of the user's own
        ;;
    esac

    local _ipcd_sub
    _ipcd_find_subcommand
    if [[ -z $_ipcd_sub ]]; then
        if [[ $cur == -* ]]; then
            _ipcd_reply "-c --config --version -h --help"
        else
            _ipcd_reply "submit result status list show tail cancel pause resume purge failed retry wait schedules key logs stats"
        fi
        return 0
    fi

    local opts takes=""
    case $_ipcd_sub in
    submit)
        opts="--json --wait --timeout --timeout-job --delay --priority --expire --after --no-confirm --send-timeout --unique -q --quiet"
        takes="--timeout --timeout-job --delay --priority --expire --after --send-timeout --unique"
        ;;
    result)
        opts="--wait --timeout --json --log --output --color"
        takes="--timeout --color"
        ;;
    status) opts="--json --watch" ;;
    list)
        opts="--state --type --unique -n --limit --json"
        takes="--state --type --unique -n --limit"
        ;;
    show)
        opts="--json --color"
        takes="--color"
        ;;
    tail) opts="--json" ;;
    cancel)
        opts="--type --state --kill --json"
        takes="--type --state"
        ;;
    pause)
        opts="--wait --timeout --json"
        takes="--timeout"
        ;;
    resume) opts="--json" ;;
    purge)
        opts="--state --older-than --json"
        takes="--state --older-than"
        ;;
    wait)
        opts="--any --timeout --json"
        takes="--timeout"
        ;;
    failed | schedules) opts="--json" ;;
    retry | key) opts="" ;;
    logs)
        opts="-f --follow --job --type --level --since --json -n --lines --color"
        takes="--job --type --level --since -n --lines --color"
        ;;
    stats)
        opts="--prometheus --json --output -o"
        takes="--output -o"
        ;;
    *) return 0 ;;
    esac
    if [[ $cur == -* ]]; then
        # -c/--config is accepted after the subcommand as well as before it.
        _ipcd_reply "$opts -c --config -h --help"
        return 0
    fi
    local n
    n=$(_ipcd_count_positionals "$takes -c --config")
    case $_ipcd_sub:$n in
    submit:0 | pause:* | resume:*)
        _ipcd_reply "$(_ipcd_handler_names)"
        ;;
    retry:0)
        local -a cfgargs
        mapfile -t cfgargs < <(_ipcd_config_args)
        # `ipcctl failed` lines start with the job id; its last line may say how many
        # older entries were dropped.
        _ipcd_reply "$("${COMP_WORDS[0]}" "${cfgargs[@]}" failed 2>/dev/null |
            awk '$1 ~ /^[0-9A-Za-z_.-]+$/ && $2 == "type" { print $1 }')"
        ;;
    wait:*)
        # The jobs that have not ended: `ipcctl list` prints a header line, then an id
        # at the start of each line.
        local -a cfgargs
        mapfile -t cfgargs < <(_ipcd_config_args)
        _ipcd_reply "$("${COMP_WORDS[0]}" "${cfgargs[@]}" list --state queued --state scheduled \
            --state running 2>/dev/null | awk 'NR > 1 { print $1 }')"
        ;;
    esac
    return 0
}

_ipcd() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    COMPREPLY=()
    if [[ $cur == "=" ]]; then
        cur=
    elif [[ $prev == "=" ]] && ((COMP_CWORD >= 2)); then
        prev=${COMP_WORDS[COMP_CWORD - 2]}
    fi
    case $cur in
    --config=*) # one word when COMP_WORDBREAKS lacks "="
        cur=${cur#--config=}
        _ipcd_reply_files
        COMPREPLY=("${COMPREPLY[@]/#/--config=}")
        return 0
        ;;
    esac
    case $prev in
    -c | --config)
        _ipcd_reply_files
        return 0
        ;;
    esac
    local _ipcd_sub
    _ipcd_find_subcommand
    if [[ $cur == -* ]]; then
        if [[ -z $_ipcd_sub ]]; then
            _ipcd_reply "-c --config --version -h --help"
        else
            _ipcd_reply "-c --config -h --help"
        fi
    elif [[ -z $_ipcd_sub ]]; then
        _ipcd_reply "start run stop reload status check"
    fi
    return 0
}

complete -F _ipcctl ipcctl
complete -F _ipcd ipcd
