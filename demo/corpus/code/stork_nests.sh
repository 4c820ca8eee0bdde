#!/usr/bin/env bash
# Summarise a CSV of stork nest observations: village,year,chicks
# Usage: ./stork_nests.sh nests.csv [year]
set -euo pipefail

file="${1:?usage: $0 FILE.csv [YEAR]}"
year="${2:-}"

if [[ ! -r "$file" ]]; then
    echo "error: cannot read $file" >&2
    exit 2
fi

# Skip the header, keep one year if asked, then total the chicks per village.
tail -n +2 "$file" \
    | awk -F, -v year="$year" 'year == "" || $2 == year { chicks[$1] += $3; nests[$1]++ }
        END {
            for (v in chicks) printf "%-20s %3d nests %4d chicks %5.2f per nest\n", v, nests[v], chicks[v], chicks[v] / nests[v]
        }' \
    | sort -k4 -n -r

echo "busy villages first; a nest with no chicks still counts as a nest"
