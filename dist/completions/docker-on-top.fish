# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_docker_on_top_global_optspecs
    string join \n root= h/help V/version
end

function __fish_docker_on_top_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_docker_on_top_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_docker_on_top_using_subcommand
    set -l cmd (__fish_docker_on_top_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -l root -d 'The state directory' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -s V -l version -d 'Print version'
complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -f -a "serve" -d 'Serve the plugin socket (the default command)'
complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -f -a "ls" -d 'List every volume: base, volatile, mounted, active mounts, size of its changes'
complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -f -a "inspect" -d 'Show one volume, as JSON (the default and only format; `--json` is accepted)'
complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -f -a "changes" -d 'What a volume changed, one line per path: A added, C changed, D deleted'
complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -f -a "recover" -d 'Copy a volume\'s added and changed entries into DEST (new or empty)'
complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -f -a "export" -d 'Write a volume\'s changes as a tar stream (OCI layer whiteouts)'
complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -f -a "reset" -d 'Discard the changes of a volume that is not mounted'
complete -c docker-on-top -n "__fish_docker_on_top_needs_command" -f -a "commit" -d 'Apply the changes of a volume that is not mounted to its base, then reset it'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand serve" -l socket -d 'The plugin socket to create (ignored when systemd passes one)' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand serve" -l idle-timeout -d 'Exit once no request has arrived for this long (e.g. 30s, 5min)' -r
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand serve" -l allowed-base -d 'Only create volumes whose base is DIR or lies inside it (repeatable; default: any directory, or the colon-separated list in DOCKER_ON_TOP_ALLOWED_BASES). Paths are compared after resolving symlinks, component by component' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand serve" -l host-root -d 'The host\'s / is mounted at DIR (a managed plugin\'s view): bases are host paths, looked up under DIR as if it were /' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand serve" -l mount-dir -d 'Mount each volume at DIR/NAME instead of in its directory under --root (a managed plugin\'s propagated mount)' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand serve" -l root -d 'The state directory' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand serve" -l legacy-mount-api -d 'Mount with legacy mount(2) even where the new mount API works'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand ls" -l root -d 'The state directory' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand ls" -l json -d 'JSON (an array of `inspect` objects) instead of a table'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand ls" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand inspect" -l root -d 'The state directory' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand inspect" -l json -d 'JSON (already the default)'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand inspect" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand changes" -l root -d 'The state directory' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand changes" -l json -d 'JSON instead of lines'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand changes" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand recover" -l root -d 'The state directory' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand recover" -s v -l verbose -d 'One line per action taken, then the summary'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand recover" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand export" -s o -l output -d 'Write to FILE instead of standard output' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand export" -l root -d 'The state directory' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand export" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand reset" -l root -d 'The state directory' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand reset" -s v -l verbose -d 'One line per action taken, then the summary'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand reset" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand commit" -l root -d 'The state directory' -r -F
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand commit" -l yes -d 'Really do it; without it, only list what would change'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand commit" -s v -l verbose -d 'One line per action taken, then the summary'
complete -c docker-on-top -n "__fish_docker_on_top_using_subcommand commit" -s h -l help -d 'Print help (see more with \'--help\')'
