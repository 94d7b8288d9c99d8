#!/usr/bin/env bash
# Turns BenchmarkScale's output (go test -bench, on stdin or in $1) into
# docs/scale.png: attach time, RSS and scrape time against the number of
# pod namespaces. Needs gnuplot (Debian: gnuplot-nox).
set -euo pipefail
in=${1:-/dev/stdin}
out=${2:-docs/scale.png}
dat=$(mktemp)
trap 'rm -f "$dat"' EXIT
awk '/^BenchmarkScale\/pods=/ {
	split($1, a, "="); split(a[2], b, "-"); pods = b[1]
	for (i = 1; i < NF; i++) {
		if ($(i+1) == "s_to_ready") attach = $i
		if ($(i+1) == "MiB_rss") rss = $i
		if ($(i+1) == "ms_scrape_median") scrape = $i
		if ($(i+1) == "ms_new_pod_p99") churn = $i
	}
	print pods, attach, rss, scrape, churn
}' "$in" > "$dat"
[ -s "$dat" ] || { echo "plot.sh: no BenchmarkScale lines in $in" >&2; exit 1; }
gnuplot <<GP
set terminal pngcairo size 900,420 font "sans,10"
set output "$out"
set multiplot layout 1,2 title "nsflow serve at scale (one run, 2-core VM)"
set logscale x
set xlabel "pod namespaces"
set key top left
set grid
set ylabel "seconds / MiB"
plot "$dat" using 1:2 with linespoints title "time to all attached (s)", \
     "$dat" using 1:(\$3/10) with linespoints title "RSS (MiB / 10)"
set ylabel "milliseconds"
plot "$dat" using 1:4 with linespoints title "full scrape, median (ms)", \
     "$dat" using 1:5 with linespoints title "new pod attached, p99 (ms)"
unset multiplot
GP
echo "wrote $out"
