# Runs scenario $1 (try $2) with the helpers of lib.sh and reports it.
. /lab/lib.sh
SCENARIO="$1"
TRY="$2"
FAILED=0
VMS=
echo "LAB-SCENARIO-START $SCENARIO $2"
trace_start
started="$(now)"
# Reports the verdict and ends the scenario: at its end, or at the first
# failed check (lib.sh `fail`).
end_scenario() {
    if [ "$FAILED" -ne 0 ]; then
        dump
        verdict=fail
    else
        verdict=pass
    fi
    stop_all
    echo "LAB-SCENARIO-END $SCENARIO $TRY $verdict seconds=$(since "$started")"
    exit 0
}
. "/lab/scenarios/$SCENARIO.sh"
end_scenario
