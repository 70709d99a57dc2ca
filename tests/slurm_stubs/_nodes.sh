# shellcheck shell=bash
# Shared by the stubs: expand a SLURM node list ("node-[0-2,5],login1") into one name per line.
expand_nodelist() {
    local list=$1 item prefix range part lo hi width i
    # Split on commas that are not inside brackets.
    local depth=0 cur="" ch items=()
    for ((i = 0; i < ${#list}; i++)); do
        ch=${list:i:1}
        case "$ch" in
            "[") depth=$((depth + 1)); cur+=$ch ;;
            "]") depth=$((depth - 1)); cur+=$ch ;;
            ,) if ((depth == 0)); then items+=("$cur"); cur=""; else cur+=$ch; fi ;;
            *) cur+=$ch ;;
        esac
    done
    [[ -n "$cur" ]] && items+=("$cur")
    for item in "${items[@]}"; do
        if [[ "$item" =~ ^([^[]*)\[([^]]*)\](.*)$ ]]; then
            prefix=${BASH_REMATCH[1]}
            local suffix=${BASH_REMATCH[3]}
            IFS=, read -r -a range <<<"${BASH_REMATCH[2]}"
            for part in "${range[@]}"; do
                if [[ "$part" == *-* ]]; then
                    lo=${part%-*}; hi=${part#*-}; width=${#lo}
                    for ((i = 10#$lo; i <= 10#$hi; i++)); do printf '%s%0*d%s\n' "$prefix" "$width" "$i" "$suffix"; done
                else
                    printf '%s%s%s\n' "$prefix" "$part" "$suffix"
                fi
            done
        else
            printf '%s\n' "$item"
        fi
    done
}

stub_state_dir() {
    local d=${SLURM_STUB_STATE:?"set SLURM_STUB_STATE to a directory where the SLURM stubs record calls"}
    mkdir -p "$d"
    printf '%s\n' "$d"
}
