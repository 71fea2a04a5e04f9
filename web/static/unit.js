// Draws a unit's load curve from the page's JSON (import actual, import estimated, export; gaps are missing).
"use strict";
(function () {
  const curve = JSON.parse(document.getElementById("curve").textContent);
  const el = document.getElementById("chart");
  const opts = {
    width: Math.max(480, el.clientWidth || 900),
    height: 320,
    scales: { x: { time: true } },
    // the times of the settings' zone, whatever the browser's
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), curve.zone),
    series: [
      {},
      { label: "import, actual", stroke: "#1f5fa8", width: 1.5, spanGaps: false },
      { label: "import, estimated", stroke: "#d98c00", width: 1.5, dash: [6, 4], spanGaps: false },
      { label: "export", stroke: "#2e8b57", width: 1, spanGaps: false },
    ],
    axes: [{}, { label: "kWh" }],
  };
  window.smameChart = new uPlot(opts, [curve.t, curve.actual, curve.estimated, curve.export], el);
})();
