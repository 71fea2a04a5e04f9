// Draws the fleet page's trend from its JSON: telegrams an hour over the last day (those carrying readings of
// the last two days: an older backlog is left out), and by day the readings
// received against those expected and the units at risk; times in the settings' zone, dates as ISO 8601.
"use strict";
(function () {
  const trend = JSON.parse(document.getElementById("trend").textContent);
  const inZone = (ts) => uPlot.tzDate(new Date(ts * 1e3), trend.zone);
  const ymd = uPlot.fmtDate("{YYYY}-{MM}-{DD}");
  const hhmm = uPlot.fmtDate("{HH}:{mm}");
  const draw = (id, label, tick, xs, series, ys) => {
    const box = document.getElementById(id);
    if (!box || !xs.length) return null;
    return new uPlot(
      {
        width: Math.max(320, box.clientWidth || 360),
        height: 200,
        scales: { x: { time: true } },
        tzDate: inZone,
        series: [{ label: "from", value: "{YYYY}-{MM}-{DD} {HH}:{mm}" }, series],
        axes: [{ values: (u, splits) => splits.map((ts) => tick(inZone(ts))), size: 40 }, { label }],
      },
      [xs, ys],
      box,
    );
  };
  window.smameTrend = [
    draw("chart-telegrams", "telegrams an hour", hhmm, trend.hours, { label: "telegrams", stroke: "#1f5fa8" }, trend.telegrams),
    draw("chart-completeness", "% of readings", ymd, trend.days, { label: "completeness %", stroke: "#2e8b57" }, trend.completeness),
    draw("chart-at-risk", "units at risk", ymd, trend.days, { label: "at risk", stroke: "#b00020" }, trend.at_risk),
  ].filter(Boolean);
})();
