/* headint report viewer: draws the interactive views of a headint report (heatmaps, bar and
   pair charts, the head table, attention patterns, a circuit graph) from the JSON data block of
   its report (see headint/results/report_data.py for the schema). No network, no library.
   Every string from the data enters the page as text (textContent, setAttribute), never as
   HTML. One call of render() per report; several reports can share a page (a notebook): each
   keeps its state in its own root element, and nothing here uses a global id. */
(function () {
  "use strict";
  var VERSION = 1;
  if (window.headintViewer && window.headintViewer.version >= VERSION) return;
  var SVGNS = "http://www.w3.org/2000/svg";

  // ------------------------------------------------------------------ DOM helpers
  function setAttrs(e, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) return;
      if (k === "text") e.textContent = String(v);
      else e.setAttribute(k, String(v));
    });
  }
  function append(e, c) {
    if (c === null || c === undefined) return;
    if (Array.isArray(c)) c.forEach(function (x) { append(e, x); });
    else if (typeof c === "string") e.appendChild(document.createTextNode(c));
    else e.appendChild(c);
  }
  function h(tag, attrs, children) { var e = document.createElement(tag); setAttrs(e, attrs); append(e, children); return e; }
  function s(tag, attrs, children) { var e = document.createElementNS(SVGNS, tag); setAttrs(e, attrs); append(e, children); return e; }
  function clamp(x, lo, hi) { return Math.max(lo, Math.min(hi, x)); }
  function finite(v) { return v !== null && v !== undefined && isFinite(v); }

  // ------------------------------------------------------------------ numbers and tokens
  /* Decimals for a column: 3, more (up to 6) when its largest |value| is below 0.01 so that
     value keeps 2 significant digits, 0 from 10,000 up (headint.results.report.decimals_for). */
  function decimalsFor(values) {
    var m = 0;
    values.forEach(function (v) { if (finite(v)) m = Math.max(m, Math.abs(v)); });
    if (m === 0) return 3;
    if (m >= 10000) return 0;
    return clamp(1 - Math.floor(Math.log10(m)), 3, 6);
  }
  function fmt(x, d) {
    if (!finite(x)) return "n/a";
    var t = Number(x).toFixed(d);
    if (/^-0(\.0*)?$/.test(t)) t = t.slice(1);
    return t;
  }
  /* A token as a label: spaces shown as U+2423, newlines and tabs escaped (as in the PNG plots). */
  function visible(tok) {
    return String(tok).replace(/ /g, "\u2423").replace(/\n/g, "\\n").replace(/\r/g, "\\r").replace(/\t/g, "\\t");
  }
  function short(text, n) { text = String(text); return text.length > n ? text.slice(0, n - 1) + "\u2026" : text; }
  function quoted(tok) { return "\u201c" + visible(tok) + "\u201d"; }

  // ------------------------------------------------------------------ colours
  var RDBU = ["#67001f", "#b2182b", "#d6604d", "#f4a582", "#fddbc7", "#f7f7f7", "#d1e5f0", "#92c5de", "#4393c3", "#2166ac", "#053061"];
  var BLUES = ["#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"];
  function rgb(hex) { return [1, 3, 5].map(function (i) { return parseInt(hex.slice(i, i + 2), 16); }); }
  function ramp(stops, t) {
    var x = clamp(t, 0, 1) * (stops.length - 1), i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
    var a = rgb(stops[i]), b = rgb(stops[i + 1]);
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); }).join(",") + ")";
  }
  /* Diverging colour of v on [-lim, lim]: negative red, zero white, positive blue (matplotlib RdBu). */
  function diverging(v, lim) { return finite(v) ? ramp(RDBU, 0.5 + 0.5 * v / lim) : "#d9d9d9"; }
  function sequential(w) { return finite(w) ? ramp(BLUES, w) : "#d9d9d9"; }
  function symLimit(values) {
    var m = 0;
    values.forEach(function (v) { if (finite(v)) m = Math.max(m, Math.abs(v)); });
    return m > 0 ? m : 1;
  }
  function niceTicks(lo, hi, n) {
    var span = hi - lo;
    if (!(span > 0)) return [lo];
    var step = Math.pow(10, Math.floor(Math.log10(span / n))), err = span / n / step;
    step *= err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1;
    var out = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return out;
  }

  // ------------------------------------------------------------------ tooltip
  function Tip(root) {
    this.node = h("div", { "class": "hi-tip", role: "tooltip" });
    this.node.style.display = "none";
    root.appendChild(this.node);
  }
  Tip.prototype.show = function (ev, lines) {
    var node = this.node;
    node.textContent = "";
    lines.forEach(function (line, i) { node.appendChild(h("div", { "class": i === 0 ? "hi-tip-title" : null, text: line })); });
    node.style.display = "block";
    var r = node.getBoundingClientRect(), x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + r.width > window.innerWidth - 4) x = ev.clientX - r.width - 14;
    if (y + r.height > window.innerHeight - 4) y = ev.clientY - r.height - 14;
    node.style.left = Math.max(4, x) + "px";
    node.style.top = Math.max(4, y) + "px";
  };
  Tip.prototype.hide = function () { this.node.style.display = "none"; };

  /* Hover and click on the children of `container` that carry data-i. */
  function delegate(app, container, lines, click) {
    function target(ev) { var t = ev.target.closest ? ev.target.closest("[data-i]") : null; return t && container.contains(t) ? t : null; }
    container.addEventListener("mousemove", function (ev) {
      var t = target(ev);
      if (t) app.tip.show(ev, lines(Number(t.getAttribute("data-i")))); else app.tip.hide();
    });
    container.addEventListener("mouseleave", function () { app.tip.hide(); });
    if (click) container.addEventListener("click", function (ev) { var t = target(ev); if (t) click(Number(t.getAttribute("data-i"))); });
  }

  // ------------------------------------------------------------------ scans
  /* The head a grid cell intervenes on ("LlHh"; flat row-major index i), and the cell's name. */
  function cellHead(view, i) {
    if (view.kind === "sets") return view.heads_of[i][0] || null;
    var hi = view.kind === "positions" ? Math.floor(i / view.positions) : i;
    return "L" + Math.floor(hi / view.heads) + "H" + (hi % view.heads);
  }
  function cellName(view, i) {
    if (view.kind === "sets") return view.names[i];
    return cellHead(view, i) + (view.kind === "positions" ? " position " + (i % view.positions) : "");
  }
  function cellLines(view, i, dec) {
    var c = view.cells, out = [cellName(view, i)];
    if (view.kind === "positions" && view.tokens) {
      var p = i % view.positions;
      out[0] += " " + quoted(view.tokens[p]);
    }
    if (c.effect) out.push("effect " + fmt(c.effect[i], dec.effect) + " \u00b1 " + fmt(c.effect_stderr[i], dec.effect));
    out.push("value " + fmt(c.value[i], dec.value) + " \u00b1 " + fmt(c.stderr[i], dec.value));
    out.push("n = " + c.n[i] + " examples");
    return out;
  }
  function scanDecimals(view) {
    var c = view.cells;
    return { effect: c.effect ? decimalsFor(c.effect) : 3, value: decimalsFor(c.value) };
  }

  function colourBar(g, x, y, height, lim, dec, label) {
    var n = 48, w = 14;
    for (var k = 0; k < n; k++) {
      var v = lim - (2 * lim * (k + 0.5)) / n;
      g.appendChild(s("rect", { x: x, y: y + (height * k) / n, width: w, height: height / n + 0.5, fill: diverging(v, lim) }));
    }
    g.appendChild(s("rect", { x: x, y: y, width: w, height: height, fill: "none", stroke: "#888" }));
    [[lim, 0], [0, 0.5], [-lim, 1]].forEach(function (t) {
      var ty = y + t[1] * height;
      g.appendChild(s("line", { x1: x + w, x2: x + w + 4, y1: ty, y2: ty, stroke: "#444" }));
      g.appendChild(s("text", { x: x + w + 6, y: ty + 4, "font-size": 12, text: fmt(t[0], dec) }));
    });
    var widest = Math.max(fmt(lim, dec).length, fmt(-lim, dec).length);
    var lx = x + w + 16 + widest * 7.2, ly = y + height / 2;
    g.appendChild(s("text", { x: lx, y: ly, "font-size": 12, "text-anchor": "middle", transform: "rotate(-90 " + lx + " " + ly + ")", text: label }));
  }

  function heatmap(app, view) {
    var c = view.cells, q = view.quantity, vals = c[q], dec = scanDecimals(view), lim = symLimit(vals);
    var pos = view.kind === "positions", L = view.layers, H = view.heads, P = pos ? view.positions : 1;
    var nRows = pos ? L * H : L, nCols = pos ? P : H;
    var cw = clamp(Math.floor(640 / nCols), pos ? 8 : 18, 72), ch = clamp(Math.floor((pos ? 520 : 360) / nRows), 8, 48);
    var colEvery = Math.ceil(14 / cw), rowEvery = Math.ceil(13 / ch);
    var colText = function (j) { return pos ? (view.tokens ? j + " " + short(visible(view.tokens[j]), 12) : String(j)) : String(j); };
    var longest = 0;
    for (var j = 0; j < nCols; j += colEvery) longest = Math.max(longest, colText(j).length);
    var left = pos ? 64 : 56, top = pos ? 10 : 40, bottom = pos ? 34 + Math.round(longest * 7.2) : 14;
    var gw = nCols * cw, gh = nRows * ch, width = left + gw + 130, height = top + gh + bottom;
    var svg = s("svg", { width: width, height: height, "class": "hi-heatmap", role: "img", "aria-label": view.caption + ": " + view.label });
    var cells = s("g");
    for (var r = 0; r < nRows; r++) {
      for (var k = 0; k < nCols; k++) {
        var i = r * nCols + k, v = vals[i];
        var rect = s("rect", { "class": "hi-cell", x: left + k * cw, y: top + r * ch, width: cw, height: ch, fill: diverging(v, lim),
                              "data-i": i, "data-cell": pos ? cellHead(view, i) + ":" + k : cellHead(view, i) });
        cells.appendChild(rect);
        if (!pos && cw >= 46 && ch >= 22 && finite(v)) {
          cells.appendChild(s("text", { x: left + k * cw + cw / 2, y: top + r * ch + ch / 2 + 4, "font-size": 11, "text-anchor": "middle",
                                        "pointer-events": "none", style: "fill:" + (Math.abs(v / lim) > 0.55 ? "#fff" : "#222"),
                                        text: fmt(v, dec[q]) }));
        }
      }
    }
    svg.appendChild(cells);
    var axes = s("g");
    for (r = 0; r < nRows; r += rowEvery) {
      var rl = pos ? "L" + Math.floor(r / H) + "H" + (r % H) : String(r);
      axes.appendChild(s("text", { x: left - 6, y: top + r * ch + ch / 2 + 4, "font-size": 12, "text-anchor": "end", text: rl }));
    }
    if (pos) {
      for (var l = 1; l < L; l++) axes.appendChild(s("line", { x1: left, x2: left + gw, y1: top + l * H * ch, y2: top + l * H * ch, stroke: "#000", "stroke-width": 0.8 }));
      for (k = 0; k < nCols; k += colEvery) {
        var cx = left + k * cw + cw / 2 + 4, cy = top + gh + 6;
        axes.appendChild(s("text", { x: cx, y: cy, "font-size": 12, "text-anchor": "end", transform: "rotate(-90 " + cx + " " + cy + ")", text: colText(k) }));
      }
      axes.appendChild(s("text", { x: left + gw / 2, y: height - 4, "font-size": 12, "text-anchor": "middle", text: view.tokens ? "position and token" : "position" }));
      axes.appendChild(s("text", { x: 12, y: top + gh / 2, "font-size": 12, "text-anchor": "middle", transform: "rotate(-90 12 " + (top + gh / 2) + ")", text: "layer, head" }));
    } else {
      for (k = 0; k < nCols; k += colEvery) axes.appendChild(s("text", { x: left + k * cw + cw / 2, y: top - 6, "font-size": 12, "text-anchor": "middle", text: String(k) }));
      axes.appendChild(s("text", { x: left + gw / 2, y: 14, "font-size": 12, "text-anchor": "middle", text: "head" }));
      axes.appendChild(s("text", { x: 14, y: top + gh / 2, "font-size": 12, "text-anchor": "middle", transform: "rotate(-90 14 " + (top + gh / 2) + ")", text: "layer" }));
    }
    colourBar(axes, left + gw + 14, top, Math.max(gh, 80), lim, dec[q], view.label);
    svg.appendChild(axes);
    var sel = s("rect", { "class": "hi-selbox", fill: "none", stroke: "#000", "stroke-width": 2.5, "pointer-events": "none", visibility: "hidden" });
    svg.appendChild(sel);
    app.onSelect(function (head) {
      var m = /^L(\d+)H(\d+)$/.exec(head || "");
      if (!m || +m[1] >= L || +m[2] >= H) { sel.setAttribute("visibility", "hidden"); return; }
      var la = +m[1], he = +m[2];
      if (pos) setAttrs(sel, { x: left, y: top + (la * H + he) * ch, width: gw, height: ch, visibility: "visible" });
      else setAttrs(sel, { x: left + he * cw, y: top + la * ch, width: cw, height: ch, visibility: "visible" });
    });
    delegate(app, cells, function (i) { return cellLines(view, i, dec); }, function (i) { app.select(cellHead(view, i)); });
    return svg;
  }

  /* Horizontal bars, one row per head set: (bars [{name, value, err, colour}] per row). */
  function barChart(app, rows, opts) {
    var rowH = opts.series.length > 1 ? 30 : 22, barH = (rowH - 8) / opts.series.length;
    var longest = rows.reduce(function (m, r) { return Math.max(m, r.name.length); }, 4);
    var left = Math.min(260, 16 + longest * 7.4), plotW = 440, top = 28, height = top + rows.length * rowH + 44;
    var lo = 0, hi = 0;
    rows.forEach(function (r) {
      opts.series.forEach(function (se) {
        var v = r[se.key], e = finite(r[se.key + "_err"]) ? r[se.key + "_err"] : 0;
        if (finite(v)) { lo = Math.min(lo, v - e); hi = Math.max(hi, v + e); }
      });
    });
    if (lo === hi) hi = lo + 1;
    var pad = 0.04 * (hi - lo);
    lo -= lo < 0 ? pad : 0; hi += hi > 0 ? pad : 0;
    var X = function (v) { return left + ((v - lo) / (hi - lo)) * plotW; };
    var svg = s("svg", { width: left + plotW + 30, height: height, "class": "hi-bars", role: "img", "aria-label": opts.label });
    var legend = s("g");
    var lx = left;
    if (opts.series.length > 1) opts.series.forEach(function (se) {  // one series: the axis label says it
      legend.appendChild(s("rect", { x: lx, y: 6, width: 12, height: 12, fill: se.colour || "#888", stroke: "#333" }));
      legend.appendChild(s("text", { x: lx + 16, y: 16, "font-size": 12, text: se.label }));
      lx += 30 + se.label.length * 7;
    });
    svg.appendChild(legend);
    var grid = s("g"), ticks = niceTicks(lo, hi, 6);
    var tickDec = ticks.length > 1 ? clamp(-Math.floor(Math.log10(ticks[1] - ticks[0]) + 1e-9), 0, 6) : 3;
    ticks.forEach(function (t) {
      grid.appendChild(s("line", { x1: X(t), x2: X(t), y1: top - 2, y2: top + rows.length * rowH, stroke: t === 0 ? "#000" : "#e3e3e3" }));
      grid.appendChild(s("text", { x: X(t), y: top + rows.length * rowH + 16, "font-size": 12, "text-anchor": "middle", text: fmt(t, tickDec) }));
    });
    grid.appendChild(s("text", { x: left + plotW / 2, y: height - 6, "font-size": 12, "text-anchor": "middle", text: opts.label }));
    svg.appendChild(grid);
    var bars = s("g");
    rows.forEach(function (r, i) {
      var y0 = top + i * rowH;
      var row = s("g", { "data-i": i, "class": "hi-bar", "data-set": r.name });
      row.appendChild(s("rect", { x: 0, y: y0, width: left + plotW, height: rowH, fill: "transparent" }));
      row.appendChild(s("text", { x: left - 6, y: y0 + rowH / 2 + 4, "font-size": 12, "text-anchor": "end", text: r.name }));
      opts.series.forEach(function (se, k) {
        var v = r[se.key], e = r[se.key + "_err"], y = y0 + 4 + k * barH;
        if (!finite(v)) return;
        row.appendChild(s("rect", { x: Math.min(X(0), X(v)), y: y, width: Math.abs(X(v) - X(0)), height: barH, fill: se.colour || r.colour, stroke: "#333", "stroke-width": 0.5 }));
        if (finite(e) && e > 0) {
          var ym = y + barH / 2;
          row.appendChild(s("line", { x1: X(v - e), x2: X(v + e), y1: ym, y2: ym, stroke: "#000" }));
          row.appendChild(s("line", { x1: X(v - e), x2: X(v - e), y1: ym - 3, y2: ym + 3, stroke: "#000" }));
          row.appendChild(s("line", { x1: X(v + e), x2: X(v + e), y1: ym - 3, y2: ym + 3, stroke: "#000" }));
        }
      });
      bars.appendChild(row);
    });
    svg.appendChild(bars);
    delegate(app, bars, function (i) { return opts.lines(rows[i]); }, function (i) { if (rows[i].head) app.select(rows[i].head); });
    return svg;
  }

  var MAX_BARS = 60;

  function setChart(app, view, holder) {
    var c = view.cells, q = view.quantity, dec = scanDecimals(view), pairs = view.pairs;
    var d = pairs ? decimalsFor(pairs.effect.concat(pairs.singles_sum)) : dec[q];
    var all = view.names.map(function (name, i) {
      var r = { name: name, i: i, head: cellHead(view, i), n: c.n[i] };
      if (pairs) {
        r.joint = pairs.effect[i]; r.joint_err = pairs.effect_stderr[i];
        r.sum = pairs.singles_sum[i]; r.sum_err = pairs.singles_sum_stderr[i];
        r.inter = pairs.interaction[i]; r.inter_err = pairs.interaction_stderr[i]; r.n = pairs.n[i];
      } else {
        r.v = c[q][i]; r.v_err = q === "effect" ? c.effect_stderr[i] : c.stderr[i];
      }
      return r;
    });
    var lim = symLimit(all.map(function (r) { return r.v; }));
    all.forEach(function (r) { r.colour = diverging(r.v, lim); });
    var sorts = pairs
      ? [["joint", "|joint effect|, largest first"], ["inter", "interaction (joint - summed), most negative first"], ["name", "name"]]
      : [["v", "|" + q + "|, largest first"], ["name", "name"]];
    var select = h("select", { "aria-label": "sort the bars" }, sorts.map(function (o) { return h("option", { value: o[0], text: o[1] }); }));
    var caption = h("p", { "class": "hi-caption" });
    var chart = h("div", { "class": "hi-scroll" });
    function key(r, k) { return k === "name" ? r.name : k === "inter" ? r.inter : Math.abs(r[k]); }
    function draw() {
      var k = select.value, rows = all.slice();
      rows.sort(function (a, b) {
        var x = key(a, k), y = key(b, k);
        if (k === "name") return x < y ? -1 : x > y ? 1 : 0;
        if (!finite(x)) return finite(y) ? 1 : 0;
        if (!finite(y)) return -1;
        return k === "inter" ? x - y : y - x;
      });
      var shown = rows.slice(0, MAX_BARS);
      var what = pairs ? "pairs" : "head sets", label = sorts.filter(function (o) { return o[0] === k; })[0][1];
      caption.textContent = (shown.length === rows.length ? "All " + rows.length + " " + what : "The first " + shown.length + " of " + rows.length + " " + what) +
        ", sorted by " + label + "." + (pairs ? " Each pair: the effect of intervening on both heads together beside the sum of their single effects; error bars are standard errors." : " Error bars are standard errors.");
      chart.textContent = "";
      chart.appendChild(barChart(app, shown, pairs ? {
        series: [{ key: "joint", label: "together (joint effect)", colour: "#b2182b" }, { key: "sum", label: "single effects summed", colour: "#8c8c8c" }],
        label: view.label,
        lines: function (r) {
          return [r.name, "together " + fmt(r.joint, d) + " \u00b1 " + fmt(r.joint_err, d), "single effects summed " + fmt(r.sum, d) + " \u00b1 " + fmt(r.sum_err, d),
                  "interaction " + fmt(r.inter, d) + " \u00b1 " + fmt(r.inter_err, d), "n = " + r.n + " examples"];
        }
      } : {
        series: [{ key: "v", label: q }], label: view.label,
        lines: function (r) { return cellLines(view, r.i, dec); }
      }));
    }
    select.addEventListener("change", draw);
    holder.appendChild(h("div", { "class": "hi-controls" }, [h("label", { text: "sort by " }), select]));
    holder.appendChild(caption);
    holder.appendChild(chart);
    draw();
  }

  function scanSection(app, view, main) {
    var sec = h("section", { "class": "hi-scan", "data-scan": view.key });
    sec.appendChild(h("h2", { text: main ? "Effect of each intervention" : view.caption }));
    var what = view.kind === "grid" ? "one cell per head (layers down, heads across)" : view.kind === "positions" ? "one row per head, one column per position" : "one row per head set";
    sec.appendChild(h("p", { "class": "hi-caption", text: view.describe + ". Colour: " + view.label + "; " + what +
      (view.kind === "sets" ? "." : ". Hover a cell for its numbers; click it to select the head.") }));
    if (view.kind === "sets") setChart(app, view, sec);
    else sec.appendChild(h("div", { "class": "hi-scroll" }, heatmap(app, view)));
    return sec;
  }

  // ------------------------------------------------------------------ head table
  function headTable(app, t) {
    var sec = h("section", { "class": "hi-heads" });
    var total = t.rows.length;
    var byHead = t.heads.some(function (x) { return x; });
    sec.appendChild(h("h2", { text: (byHead ? "Heads" : "Head sets") + " (" + total + " rows, most important first)" }));
    var dec = t.columns.map(function (c, j) { return c.kind === "num" ? decimalsFor(t.rows.map(function (r) { return r[j]; })) : null; });
    var keys = t.columns.map(function (c) { return c.key; });
    [["effect_stderr", "effect"], ["stderr", "value"]].forEach(function (pair) {  // a stderr as precise as its mean
      var e = keys.indexOf(pair[0]), m = keys.indexOf(pair[1]);
      if (e >= 0 && m >= 0) dec[e] = dec[m];
    });
    var state = { col: 0, dir: 1, filter: "", all: total <= t.top };
    var input = h("input", { type: "search", placeholder: "filter rows (e.g. L1, induction)", "aria-label": "filter rows" });
    var more = h("button", { type: "button" });
    var count = h("span", { "class": "hi-count hi-muted" });
    sec.appendChild(h("div", { "class": "hi-controls" }, [input, more, count]));
    var table = h("table", { "class": "hi-table" });
    var ths = t.columns.map(function (c, j) {
      var th = h("th", { "class": "hi-sortable" + (c.kind === "name" || c.kind === "text" ? " hi-name" : ""), title: c.title, scope: "col", "data-col": c.key },
                 [c.label, h("span", { "class": "hi-arrow" })]);
      th.addEventListener("click", function () {
        if (state.col === j) state.dir = -state.dir;
        else { state.col = j; state.dir = c.kind === "num" ? -1 : 1; }
        draw();
      });
      return th;
    });
    table.appendChild(h("thead", null, h("tr", null, ths)));
    var tbody = h("tbody");
    table.appendChild(tbody);
    sec.appendChild(h("div", { "class": "hi-scroll" }, table));
    var order = t.rows.map(function (_, i) { return i; });
    var text = t.rows.map(function (r) {
      return r.filter(function (_, j) { var k = t.columns[j].kind; return k === "name" || k === "text"; }).join(" ").toLowerCase();
    });
    function cmp(a, b) {
      var j = state.col, x = t.rows[a][j], y = t.rows[b][j];
      var xn = x === null || x === undefined, yn = y === null || y === undefined;
      if (xn || yn) return xn && yn ? a - b : xn ? 1 : -1;
      var r = typeof x === "string" ? x.localeCompare(y, undefined, { numeric: true }) : x - y;
      return r !== 0 ? state.dir * r : a - b;
    }
    function draw() {
      var terms = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
      var rows = order.filter(function (i) { return terms.every(function (w) { return text[i].indexOf(w) >= 0; }); });
      rows.sort(cmp);
      var shown = state.all ? rows : rows.slice(0, t.top);
      tbody.textContent = "";
      shown.forEach(function (i) {
        var row = t.rows[i];
        var tr = h("tr", { "data-head": t.heads[i], "data-row": i }, row.map(function (v, j) {
          var c = t.columns[j];
          var txt = c.kind === "num" ? fmt(v, dec[j]) : v === null || v === undefined ? "n/a" : String(v);
          return h("td", { "class": c.kind === "name" || c.kind === "text" ? "hi-name" : null, text: txt });
        }));
        if (t.heads[i] && t.heads[i] === app.selected) tr.className = "hi-selected";
        tr.addEventListener("click", function () { if (t.heads[i]) app.select(t.heads[i]); });
        tbody.appendChild(tr);
      });
      ths.forEach(function (th, j) {
        th.setAttribute("aria-sort", j === state.col ? (state.dir > 0 ? "ascending" : "descending") : "none");
        th.querySelector(".hi-arrow").textContent = j === state.col ? (state.dir > 0 ? "\u25b2" : "\u25bc") : "";
      });
      var c = t.columns[state.col];
      count.textContent = "showing " + shown.length + " of " + rows.length + " rows" + (rows.length < total ? " matching the filter (" + total + " in all)" : "") +
        ", sorted by " + c.label + (state.dir > 0 ? " (ascending)" : " (descending)");
      more.style.display = rows.length > t.top ? "" : "none";
      more.textContent = state.all ? "show the first " + t.top : "show all " + rows.length;
    }
    input.addEventListener("input", function () { state.filter = input.value; draw(); });
    more.addEventListener("click", function () { state.all = !state.all; draw(); });
    app.onSelect(function (head) {
      Array.prototype.forEach.call(tbody.children, function (tr) { tr.className = head && tr.getAttribute("data-head") === head ? "hi-selected" : ""; });
    });
    draw();
    return sec;
  }

  // ------------------------------------------------------------------ attention patterns
  function patternSection(app, p) {
    var sec = h("section", { "class": "hi-patterns" });
    sec.appendChild(h("h2", { text: "Attention patterns" }));
    sec.appendChild(h("p", { "class": "hi-caption", text: "Click a head (heatmap, table) to see where it attends on " + p.examples.length +
      (p.examples.length === 1 ? " example" : " examples") + ". Hover a token: the tokens it attends to are shaded by attention weight (query \u2192 keys)." }));
    var headSel = h("select", { "aria-label": "head" }, p.heads.map(function (n) { return h("option", { value: n, text: n }); }));
    var exButtons = p.examples.map(function (_, e) { return h("button", { type: "button", "data-example": e, "aria-pressed": e === 0 ? "true" : "false", text: "example " + (e + 1) }); });
    sec.appendChild(h("div", { "class": "hi-controls" }, [h("label", { text: "head " }), headSel, h("span", { text: " " })].concat(exButtons)));
    if (p.left_out.length) {
      sec.appendChild(h("p", { "class": "hi-warning", text: "Patterns of " + p.heads.length + " of " + (p.heads.length + p.left_out.length) +
        " heads are in this report (its size budget); left out: " + short(p.left_out.join(", "), 300) }));
    }
    var title = h("h3", { "class": "hi-pattern-title" });
    var tokens = h("div", { "class": "hi-tokens" });
    var info = h("p", { "class": "hi-attends hi-muted" });
    var matrix = h("div", { "class": "hi-scroll hi-matrix" });
    var body = h("div", { "class": "hi-pattern-body" }, [title, tokens, info, matrix]);
    sec.appendChild(body);
    var state = { head: null, ex: 0, shade: null };

    function draw() {
      tokens.textContent = ""; matrix.textContent = ""; info.textContent = ""; state.shade = null;
      var ex = p.examples[state.ex], att = ex.att[state.head];
      exButtons.forEach(function (b, e) { b.setAttribute("aria-pressed", e === state.ex ? "true" : "false"); });
      if (!att) {
        title.textContent = state.head ? state.head + ": no attention pattern recorded for this head in example " + (state.ex + 1) : "Select a head";
        info.textContent = p.heads.length ? "Patterns recorded for: " + short(p.heads.join(", "), 300) : "";
        return;
      }
      headSel.value = state.head;
      var toks = ex.tokens, Tk = toks.length, Tq = att.length, off = Tk - Tq;
      title.textContent = state.head + ", example " + (state.ex + 1) + " of " + p.examples.length + " (" + Tk + " tokens)";
      var spans = toks.map(function (tok, k) { return h("span", { "class": "hi-tok", "data-pos": k, text: visible(tok) }); });
      spans.forEach(function (sp) { tokens.appendChild(sp); });
      var rowBox = null;
      function shade(k) {
        spans.forEach(function (sp, j) {
          var w = k === null || k < off ? null : att[k - off][j];
          sp.style.background = w === null || w === undefined ? "" : sequential(w / 10000);
          sp.style.color = w !== null && w !== undefined && w > 5500 ? "#fff" : "";
          sp.className = "hi-tok" + (k === j ? " hi-query" : "");
        });
        if (rowBox) {
          if (k === null || k < off) rowBox.setAttribute("visibility", "hidden");
          else { rowBox.setAttribute("y", rowBox.y0 + (k - off) * rowBox.ch); rowBox.setAttribute("visibility", "visible"); }
        }
        if (k === null) { info.textContent = "Hover a token to see where it attends."; info.className = "hi-attends hi-muted"; return; }
        if (k < off) { info.textContent = quoted(toks[k]) + " (position " + k + ") is not a query of this pattern."; return; }
        var ranked = att[k - off].map(function (w, j) { return [w, j]; }).filter(function (x) { return x[0] !== null; })
          .sort(function (a, b) { return b[0] - a[0]; }).slice(0, 3);
        info.className = "hi-attends";
        info.textContent = quoted(toks[k]) + " (position " + k + ") attends to: " +
          ranked.map(function (x) { return quoted(toks[x[1]]) + " (" + x[1] + ") " + fmt(x[0] / 10000, 3); }).join(", ");
      }
      state.shade = shade;
      // the matrix: queries down, keys across
      var c = clamp(Math.floor(440 / Tk), 6, 24), every = Math.ceil(13 / c);
      var labels = toks.map(function (tok, k) { return k + " " + short(visible(tok), 10); });
      var longest = labels.reduce(function (m, x) { return Math.max(m, x.length); }, 0);
      var left = 16 + longest * 7.2, top = 6, bottom = 30 + Math.round(longest * 7.2), gw = Tk * c, gh = Tq * c;
      var svg = s("svg", { width: left + gw + 90, height: top + gh + bottom, "class": "hi-pattern-matrix", role: "img", "aria-label": "attention pattern of " + state.head });
      var cells = s("g");
      for (var qi = 0; qi < Tq; qi++) {
        for (var k = 0; k < Tk; k++) {
          var w = att[qi][k];
          cells.appendChild(s("rect", { x: left + k * c, y: top + qi * c, width: c, height: c, fill: sequential(w === null ? null : w / 10000), "data-i": qi * Tk + k }));
        }
      }
      svg.appendChild(cells);
      var ax = s("g");
      for (k = 0; k < Tk; k += every) {
        var cx = left + k * c + c / 2 + 4, cy = top + gh + 6;
        ax.appendChild(s("text", { x: cx, y: cy, "font-size": 12, "text-anchor": "end", transform: "rotate(-90 " + cx + " " + cy + ")", text: labels[k] }));
      }
      for (qi = 0; qi < Tq; qi += every) ax.appendChild(s("text", { x: left - 4, y: top + qi * c + c / 2 + 4, "font-size": 12, "text-anchor": "end", text: labels[qi + off] }));
      ax.appendChild(s("rect", { x: left, y: top, width: gw, height: gh, fill: "none", stroke: "#999" }));
      var bx = left + gw + 14;
      for (var b = 0; b < 40; b++) ax.appendChild(s("rect", { x: bx, y: top + (gh * b) / 40, width: 12, height: gh / 40 + 0.5, fill: sequential(1 - (b + 0.5) / 40) }));
      ax.appendChild(s("text", { x: bx + 16, y: top + 10, "font-size": 12, text: "1.0" }));
      ax.appendChild(s("text", { x: bx + 16, y: top + gh, "font-size": 12, text: "0.0" }));
      ax.appendChild(s("text", { x: left + gw / 2, y: top + gh + bottom - 4, "font-size": 12, "text-anchor": "middle", text: "key (attended to); rows: queries" }));
      svg.appendChild(ax);
      rowBox = s("rect", { x: left, width: gw, height: c, fill: "none", stroke: "#000", "stroke-width": 2, "pointer-events": "none", visibility: "hidden" });
      rowBox.y0 = top; rowBox.ch = c;
      svg.appendChild(rowBox);
      matrix.appendChild(svg);
      delegate(app, cells, function (i) {
        var qq = Math.floor(i / Tk), kk = i % Tk, ww = att[qq][kk];
        return [state.head + ": query " + (qq + off) + " " + quoted(toks[qq + off]) + " \u2192 key " + kk + " " + quoted(toks[kk]),
                "attention " + (ww === null ? "n/a" : fmt(ww / 10000, 3))];
      }, null);
      shade(null);
    }
    tokens.addEventListener("mouseover", function (ev) { var t = ev.target.closest(".hi-tok"); if (t && state.shade) state.shade(Number(t.getAttribute("data-pos"))); });
    tokens.addEventListener("mouseleave", function () { if (state.shade) state.shade(null); });
    headSel.addEventListener("change", function () { app.select(headSel.value); });
    exButtons.forEach(function (btn, e) { btn.addEventListener("click", function () { state.ex = e; draw(); }); });
    app.onSelect(function (head) { state.head = head; draw(); });
    return sec;
  }

  // ------------------------------------------------------------------ circuit graph
  function headOf(name) {  // a head node's name as the scans name heads: "L1H3" (also written "a1.h3"), else null
    var m = /^(?:L(\d+)H(\d+)|a(\d+)\.h(\d+))$/.exec(name);
    return m ? "L" + (m[1] || m[3]) + "H" + (m[2] || m[4]) : null;
  }
  function circuitSection(app, c) {
    var sec = h("section", { "class": "hi-circuit" });
    sec.appendChild(h("h2", { text: c.title }));
    var level = function (n) { return n.kind === "input" ? -1 : n.kind === "output" ? 1e9 : 2 * n.layer + (n.kind === "mlp" ? 1 : 0); };
    var levels = Array.from(new Set(c.nodes.map(level))).sort(function (a, b) { return a - b; });
    var rows = levels.map(function (lv) {
      return c.nodes.filter(function (n) { return level(n) === lv; }).sort(function (a, b) { return a.name.localeCompare(b.name, undefined, { numeric: true }); });
    });
    var boxW = function (n) { return Math.max(40, short(n.label, 14).length * 7.5 + 12); };  // a node's drawn width
    var W = rows.reduce(function (m, r) {  // nodes evenly spaced: the widest box of a row and a margin fit each slot
      return Math.max(m, (r.length + 1) * (r.reduce(function (w, n) { return Math.max(w, boxW(n)); }, 0) + 14));
    }, 520), gap = 78, top = 24, H = top + (levels.length - 1) * gap + 40;
    var at = {};
    rows.forEach(function (r, li) {
      r.forEach(function (n, k) { at[n.name] = { x: ((k + 1) * W) / (r.length + 1), y: top + (levels.length - 1 - li) * gap + 10, n: n }; });
    });
    var wmax = c.edges.reduce(function (m, e) { return finite(e.weight) ? Math.max(m, Math.abs(e.weight)) : m; }, 0) || 1;
    var dec = decimalsFor(c.edges.map(function (e) { return e.weight; }));
    var svg = s("svg", { width: W, height: H, "class": "hi-circuit-graph", role: "img", "aria-label": c.title });
    var edges = s("g");
    c.edges.forEach(function (e, i) {
      var a = at[e.source], b = at[e.target], my = a.y === b.y ? a.y - 0.6 * gap : (a.y + b.y) / 2;  // same row: an arc above it
      var bow = Math.abs(a.x - b.x) < 1 ? 16 : 0;  // a slight bow: no edge is a zero-width line
      var d = "M" + a.x + "," + a.y + " C" + (a.x + bow) + "," + my + " " + (b.x + bow) + "," + my + " " + b.x + "," + b.y;
      var colour = !finite(e.weight) ? "#999" : e.weight >= 0 ? "#2166ac" : "#b2182b";
      var g = s("g", { "class": "hi-edge", "data-i": i, "data-edge": e.source + "->" + e.target });
      g.appendChild(s("path", { d: d, fill: "none", stroke: "transparent", "stroke-width": 12 }));  // the hover target
      g.appendChild(s("path", { d: d, fill: "none", stroke: colour, "stroke-opacity": 0.75, "pointer-events": "none",
                                "stroke-width": finite(e.weight) ? 1 + (6 * Math.abs(e.weight)) / wmax : 1 }));
      edges.appendChild(g);
    });
    svg.appendChild(edges);
    var nodes = s("g");
    c.nodes.forEach(function (n, i) {
      var p = at[n.name], g = s("g", { "class": "hi-node", "data-i": i, "data-node": n.name });
      var wide = n.kind === "input" || n.kind === "output" || n.kind === "mlp" || n.kind === "other";
      var label = short(n.label, 14), w = boxW(n);
      g.appendChild(wide ? s("rect", { x: p.x - w / 2, y: p.y - 12, width: w, height: 24, rx: 5, fill: n.kind === "mlp" ? "#eee" : "#f6f6f6", stroke: "#444" })
                         : s("ellipse", { cx: p.x, cy: p.y, rx: w / 2, ry: 13, fill: "#fff", stroke: "#222", "stroke-width": 1.5 }));
      g.appendChild(s("text", { x: p.x, y: p.y + 4, "font-size": 12, "text-anchor": "middle", text: label }));
      nodes.appendChild(g);
    });
    svg.appendChild(nodes);
    sec.appendChild(h("div", { "class": "hi-scroll" }, svg));
    delegate(app, edges, function (i) {
      var e = c.edges[i];
      return [e.source + " \u2192 " + e.target + (e.kind ? " (" + e.kind + ")" : ""), c.weight_label + " " + fmt(e.weight, dec)];
    }, null);
    delegate(app, nodes, function (i) {
      var n = c.nodes[i], into = c.edges.filter(function (e) { return e.target === n.name; }).length, out = c.edges.filter(function (e) { return e.source === n.name; }).length;
      return [n.label + (n.label !== n.name ? " (" + n.name + ")" : ""), n.kind + (n.layer === null ? "" : ", layer " + n.layer) + "; " + into + " edges in, " + out + " out"]
        .concat(finite(n.score) ? ["score " + fmt(n.score, 3)] : []);
    }, function (i) { var head = headOf(c.nodes[i].name); if (head) app.select(head); });  // selects it in the rest of the report
    app.onSelect(function (head) {
      Array.prototype.forEach.call(nodes.childNodes, function (g, i) {
        g.setAttribute("class", "hi-node" + (head && headOf(c.nodes[i].name) === head ? " hi-selected" : ""));
      });
    });
    var ranked = c.edges.slice().sort(function (a, b) { return (finite(b.weight) ? Math.abs(b.weight) : -1) - (finite(a.weight) ? Math.abs(a.weight) : -1); });
    var shown = ranked.slice(0, 20);
    sec.appendChild(h("p", { "class": "hi-caption", text: (shown.length === ranked.length ? "All " + ranked.length : "The " + shown.length + " of " + ranked.length) +
      " edges with the largest |" + c.weight_label + "| (line width grows with it; blue positive, red negative):" }));
    sec.appendChild(h("table", { "class": "hi-edges" }, [h("thead", null, h("tr", null, [h("th", { "class": "hi-name", text: "edge" }), h("th", { "class": "hi-name", text: "kind" }), h("th", { text: c.weight_label })])),
      h("tbody", null, shown.map(function (e) {
        return h("tr", null, [h("td", { "class": "hi-name", text: e.source + " \u2192 " + e.target }), h("td", { "class": "hi-name", text: e.kind || "" }), h("td", { text: fmt(e.weight, dec) })]);
      }))]));
    if (c.note) sec.appendChild(h("p", { "class": "hi-caption", text: c.note }));
    return sec;
  }

  // ------------------------------------------------------------------ the app
  function App(root, data) {
    this.root = root; this.data = data; this.selected = null; this.listeners = [];
    this.tip = new Tip(root);
  }
  App.prototype.onSelect = function (fn) { this.listeners.push(fn); };
  App.prototype.select = function (head) {
    this.selected = head;
    this.root.setAttribute("data-selected", head || "");
    this.listeners.forEach(function (fn) { fn(head); });
  };

  function render(script, id) {
    var root = (script && script.closest && script.closest(".hi-report")) || document.getElementById(id);
    if (!root || root.getAttribute("data-hi-rendered")) return;
    var data = JSON.parse(root.querySelector("script.hi-data").textContent);
    var mount = root.querySelector(".hi-app");
    var app = new App(root, data);
    var scans = data.scans;
    if (scans.length) {  // a circuit's own report has no scan: the circuit alone
      var first = h("div", { "class": "hi-row" }, scanSection(app, scans[0], true));
      if (data.patterns) first.appendChild(patternSection(app, data.patterns));
      mount.appendChild(first);
      mount.appendChild(headTable(app, data.table));
      scans.slice(1).forEach(function (v) { mount.appendChild(scanSection(app, v, false)); });
    }
    if (data.circuit) mount.appendChild(circuitSection(app, data.circuit));
    var fallback = root.querySelector(".hi-static");
    if (fallback) fallback.style.display = "none";
    var start = (data.table && data.table.heads.filter(function (x) { return x; })[0]) || (data.patterns && data.patterns.heads[0]) || null;
    if (data.patterns && data.patterns.heads.length && data.patterns.heads.indexOf(start) < 0) start = data.patterns.heads[0];
    app.select(start);
    root.setAttribute("data-hi-rendered", "1");
  }

  window.headintViewer = { version: VERSION, render: render };
})();
