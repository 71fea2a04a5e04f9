// Draws a unit's load curve from the page's JSON (import actual, import estimated, export; gaps are missing),
// with times in the settings' zone on a 24-hour clock and dates as ISO 8601, whatever the browser's locale.
"use strict";
(function () {
  const curve = JSON.parse(document.getElementById("curve").textContent);
  const el = document.getElementById("chart");
  const inZone = (ts) => uPlot.tzDate(new Date(ts * 1e3), curve.zone);
  const hhmm = uPlot.fmtDate("{HH}:{mm}");
  const ymd = uPlot.fmtDate("{YYYY}-{MM}-{DD}");
  // a tick shows its time; the first tick and each midnight also show the date above it
  const ticks = (u, splits) =>
    splits.map((ts, i) => {
      const d = uPlot.tzDate(new Date(ts * 1e3), curve.zone);
      const time = hhmm(d);
      return i === 0 || time === "00:00" ? ymd(d) + "\n" + time : time;
    });
  const opts = {
    width: Math.max(480, el.clientWidth || 900),
    height: 320,
    scales: { x: { time: true } },
    tzDate: inZone,
    series: [
      { label: "half hour from", value: "{YYYY}-{MM}-{DD} {HH}:{mm}" },
      { label: "import, actual", stroke: "#1f5fa8", width: 1.5, spanGaps: false },
      { label: "import, estimated", stroke: "#d98c00", width: 1.5, dash: [6, 4], spanGaps: false },
      { label: "export", stroke: "#2e8b57", width: 1, spanGaps: false },
    ],
    axes: [{ values: ticks, size: 56 }, { label: "kWh" }],
  };
  window.smameChart = new uPlot(opts, [curve.t, curve.actual, curve.estimated, curve.export], el);
  // its health, a point a day: the radio, the delivery delay, reboots and reconnects, the clock
  const health = JSON.parse(document.getElementById("health").textContent);
  const dayTicks = (u, splits) => splits.map((ts) => ymd(uPlot.tzDate(new Date(ts * 1e3), health.zone)));
  const small = (id, label, series, data) => {
    const box = document.getElementById(id);
    if (!box || !health.t.length) return null;
    return new uPlot(
      {
        width: Math.max(360, (box.clientWidth || 440)),
        height: 200,
        scales: { x: { time: true } },
        tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), health.zone),
        series: [{ label: "day", value: "{YYYY}-{MM}-{DD}" }, ...series],
        axes: [{ values: dayTicks, size: 40 }, { label }],
      },
      [health.t, ...data],
      box,
    );
  };
  window.smameHealth = [
    small("chart-radio", "dB(m)", [{ label: "RSRP dBm", stroke: "#1f5fa8" }, { label: "SINR dB", stroke: "#2e8b57" }], [health.rsrp, health.sinr]),
    small("chart-delay", "s", [{ label: "median delay s", stroke: "#d98c00" }], [health.delay_p50]),
    small(
      "chart-reboots",
      "a day",
      [{ label: "reboots", stroke: "#b00020" }, { label: "seq restarts", stroke: "#7a4fa0" }, { label: "reconnects", stroke: "#555" }],
      [health.reboots, health.restarts, health.disconnects],
    ),
    small("chart-clock", "s", [{ label: "clock offset s", stroke: "#1f3b57" }], [health.clock_offset]),
  ].filter(Boolean);
  // the days chooser reloads the page (no inline handler: the console's Content-Security-Policy forbids them)
  const days = document.getElementById("days");
  if (days) days.addEventListener("change", () => days.form.submit());
})();
