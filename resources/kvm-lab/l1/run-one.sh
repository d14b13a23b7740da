# Runs scenario $1 (try $2) with the helpers of lib.sh and reports it.
. /lab/lib.sh
SCENARIO="$1"
FAILED=0
VMS=
echo "LAB-SCENARIO-START $SCENARIO $2"
trace_start
started="$(now)"
. "/lab/scenarios/$SCENARIO.sh"
if [ "$FAILED" -ne 0 ]; then
    dump
    verdict=fail
else
    verdict=pass
fi
stop_all
echo "LAB-SCENARIO-END $SCENARIO $2 $verdict seconds=$(since "$started")"
