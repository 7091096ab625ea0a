// The report's table of every sample: paged, sortable, filterable, with each sample's
// neighbours one click away and the user's decisions exported as a CSV. Plain JavaScript,
// no library, no network: the data is the JSON in <script id="nnsim-data">.
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("nnsim-data").textContent);
  var n = D.ids.length;
  var rowOf = {};  // dataset position -> table row
  D.ids.forEach(function (id, r) { rowOf[id] = r; });
  var columns = {};
  D.columns.forEach(function (c) { columns[c.name] = c; });
  var state = {page: 0, size: D.pageSize, sort: "rank", dir: 1, cls: "", check: "", scoreCol: D.scoreColumn,
               min: "", max: ""};
  // row -> {decision: "keep"|"relabel"|"remove", label: class index}; kept in the browser's
  // storage under this report's id, so that closing the page loses nothing (where allowed)
  var storeKey = "nnsim-decisions:" + D.reportId;
  var decisions = load();
  function load() {
    try { return JSON.parse(window.localStorage.getItem(storeKey)) || {}; } catch (e) { return {}; }
  }
  function store() {
    try { window.localStorage.setItem(storeKey, JSON.stringify(decisions)); } catch (e) { /* file:// may refuse */ }
  }
  var root = document.getElementById("explorer");
  var $ = function (sel) { return root.querySelector(sel); };

  function value(r, col) { return col === "rank" ? D.rank[r] : col === "sample" ? D.ids[r] : D.values[col][r]; }
  function missing(v) { return v === null || v === undefined || v === ""; }
  function className(c) {
    if (missing(c) || c < 0) return "?";
    return D.classes && c < D.classes.length ? D.classes[c] : String(c);
  }
  function show(col, v) {
    var kind = col === "rank" || col === "sample" ? "int" : columns[col].kind;
    if (missing(v)) return "–";
    if (kind === "class") return className(v);
    if (kind === "flag") return v ? "yes" : "";
    if (kind === "group") return v < 0 ? "" : String(v);
    if (kind === "float") return Math.abs(v) >= 1000 ? v.toFixed(0) : String(Number(v.toPrecision(3)));
    return String(v);
  }

  // -- filtering and sorting ----------------------------------------------------------
  function passesCheck(r) {
    if (!state.check) return true;
    var flagged = D.checks.map(function (c) { return isFlagged(c, r); });
    if (state.check === "any") return flagged.some(Boolean);
    if (state.check === "none") return !flagged.some(Boolean);
    var i = D.checks.map(function (c) { return c.name; }).indexOf(state.check);
    return i >= 0 && flagged[i];
  }
  function isFlagged(check, r) {
    var v = D.values[check.column][r];
    return check.kind === "group" ? !missing(v) && v >= 0 : v === true;
  }
  function passes(r) {
    if (state.cls !== "" && String(D.values.label[r]) !== state.cls) return false;
    if (!passesCheck(r)) return false;
    if (state.min !== "" || state.max !== "") {
      var v = D.values[state.scoreCol][r];
      if (missing(v)) return false;
      if (state.min !== "" && v < Number(state.min)) return false;
      if (state.max !== "" && v > Number(state.max)) return false;
    }
    return true;
  }
  function compare(a, b) {  // missing values last in both directions; ties by suspicion rank
    var va = value(a, state.sort), vb = value(b, state.sort);
    if (typeof va === "boolean") { va = +va; vb = +vb; }
    var ma = missing(va), mb = missing(vb);
    if (ma !== mb) return ma ? 1 : -1;
    if (!ma && va !== vb) return (va < vb ? -1 : 1) * state.dir;
    return D.rank[a] - D.rank[b];
  }
  function selected() {
    var rows = [];
    for (var r = 0; r < n; r++) if (passes(r)) rows.push(r);
    return rows.sort(compare);
  }

  // -- drawing ------------------------------------------------------------------------
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function picture(id, size) {
    var uri = D.thumbs[String(id)];
    if (!uri) return el("div", {"class": "noimg", style: "width:" + size + "px;height:" + size + "px"}, "–");
    var img = el("img", {alt: "sample " + id, width: size, height: size});
    img.src = uri;
    return img;
  }
  function decisionCell(r) {
    var td = el("td", {"class": "decide"});
    var pick = el("select", {"class": "decision", "data-row": r});
    ["", "keep", "relabel", "remove"].forEach(function (d) { pick.appendChild(el("option", {value: d}, d || "–")); });
    var label = el("select", {"class": "new-label", "data-row": r});
    for (var c = 0; c < D.numClasses; c++) label.appendChild(el("option", {value: c}, className(c)));
    var chosen = decisions[r];
    pick.value = chosen ? chosen.decision : "";
    var suggested = D.values.suggested_label ? D.values.suggested_label[r] : null;
    label.value = chosen && chosen.decision === "relabel" ? chosen.label : missing(suggested) || suggested < 0 ? 0 : suggested;
    label.style.display = pick.value === "relabel" ? "" : "none";
    function update() {
      label.style.display = pick.value === "relabel" ? "" : "none";
      if (!pick.value) delete decisions[r];
      else if (pick.value === "relabel") decisions[r] = {decision: "relabel", label: Number(label.value)};
      else decisions[r] = {decision: pick.value};
      store();
      counter();
    }
    pick.addEventListener("change", update);
    label.addEventListener("change", update);
    td.appendChild(pick);
    td.appendChild(label);
    return td;
  }
  function counter() {
    $("#download").textContent = "Download decisions (" + Object.keys(decisions).length + ")";
  }
  function render() {
    var rows = selected();
    var pages = Math.max(1, Math.ceil(rows.length / state.size));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    var start = state.page * state.size, shown = rows.slice(start, start + state.size);
    var body = $("tbody");
    body.textContent = "";
    shown.forEach(function (r) {
      var tr = el("tr", {"data-sample": D.ids[r]});
      tr.appendChild(el("td", {}, String(D.rank[r] + 1)));
      var who = el("td", {"class": "who"});
      var open = el("button", {type: "button", "class": "nbr", "data-sample": D.ids[r],
                               title: "show its neighbours"}, "#" + D.ids[r]);
      who.appendChild(picture(D.ids[r], 40));
      who.appendChild(open);
      tr.appendChild(who);
      tr.appendChild(decisionCell(r));
      D.shown.forEach(function (col) { tr.appendChild(el("td", {}, show(col, D.values[col][r]))); });
      body.appendChild(tr);
    });
    $("#status").textContent = rows.length ? "samples " + (start + 1) + "–" + (start + shown.length) + " of " +
      rows.length + (rows.length < n ? " (filtered from " + n + ")" : "") + " · page " + (state.page + 1) + " of " + pages
      : "no sample matches the filters";
    $("#prev").disabled = state.page === 0;
    $("#next").disabled = state.page >= pages - 1;
    root.querySelectorAll("th[data-col]").forEach(function (th) {
      var col = th.getAttribute("data-col");
      th.setAttribute("data-sorted", col === state.sort ? (state.dir > 0 ? "asc" : "desc") : "");
    });
  }

  // -- neighbours -----------------------------------------------------------------------
  function neighbours(id) {
    var r = rowOf[id];
    var panel = document.getElementById("nbr-panel");
    if (r === undefined) return;
    panel.textContent = "";
    panel.setAttribute("data-sample", id);
    var head = el("div", {"class": "nbr-head"});
    head.appendChild(el("b", {}, "#" + id + (D.keys[r] !== String(id) ? " · " + D.keys[r] : "")));
    head.appendChild(el("span", {}, " · label " + className(D.values.label[r]) + " · predicted " +
      className(D.values.prediction ? D.values.prediction[r] : null)));
    var close = el("button", {type: "button", "class": "close"}, "close");
    close.addEventListener("click", function () { panel.hidden = true; });
    head.appendChild(close);
    panel.appendChild(head);
    var list = el("div", {"class": "nbr-list"});
    var main = el("figure", {"class": "main", "data-sample": id});
    main.appendChild(picture(id, 88));
    main.appendChild(el("figcaption", {}, "#" + id + " · " + className(D.values.label[r])));
    list.appendChild(main);
    var pairs = D.neighbors[r];
    if (!pairs.length) list.appendChild(el("p", {"class": "muted"}, "no neighbours (no gradient direction)"));
    pairs.forEach(function (p) {
      var nr = rowOf[p[0]];
      var f = el("figure", {"class": "small nbr-item", "data-sample": p[0], "data-similarity": p[1]});
      f.appendChild(picture(p[0], 54));
      var same = nr !== undefined && D.values.label[nr] === D.values.label[r];
      var cap = el("figcaption", {});
      cap.appendChild(el("span", {"class": "lab " + (same ? "good" : "bad")},
                         nr === undefined ? "?" : className(D.values.label[nr])));
      cap.appendChild(document.createTextNode(" #" + p[0] + " · " + (p[1] === null ? "–" : p[1].toFixed(3))));
      f.appendChild(cap);
      list.appendChild(f);
    });
    panel.appendChild(list);
    panel.appendChild(el("p", {"class": "muted"}, "Click a neighbour to see its own neighbours. Green: the same " +
      "label as #" + id + ", red: another label; the number is the similarity."));
    panel.hidden = false;
  }
  document.addEventListener("click", function (e) {  // any sample of the page: table, galleries, this panel
    var t = e.target.closest("[data-sample]");
    if (!t || t.tagName === "TR") return;
    neighbours(Number(t.getAttribute("data-sample")));
  });

  // -- export -------------------------------------------------------------------------
  function quote(s) { s = String(s); return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }
  function csv() {
    var lines = ["path_or_index,decision,new_label"];
    Object.keys(decisions).map(Number).sort(function (a, b) { return a - b; }).forEach(function (r) {
      var d = decisions[r];
      lines.push([quote(D.keys[r]), d.decision, d.decision === "relabel" ? quote(className(d.label)) : ""].join(","));
    });
    return lines.join("\n") + "\n";
  }
  function download() {
    var a = el("a", {download: "decisions.csv"});
    a.href = URL.createObjectURL(new Blob([csv()], {type: "text/csv"}));
    document.body.appendChild(a);
    a.click();
    a.remove();
  }

  // -- controls -------------------------------------------------------------------------
  root.querySelectorAll("th[data-col]").forEach(function (th) {
    th.addEventListener("click", function () {
      var col = th.getAttribute("data-col");
      if (state.sort === col) state.dir = -state.dir;
      else { state.sort = col; state.dir = 1; }
      state.page = 0;
      render();
    });
  });
  function bind(sel, key) {
    $(sel).addEventListener("change", function () { state[key] = this.value; state.page = 0; render(); });
  }
  bind("#f-class", "cls");
  bind("#f-check", "check");
  bind("#f-score", "scoreCol");
  bind("#f-min", "min");
  bind("#f-max", "max");
  $("#prev").addEventListener("click", function () { state.page--; render(); });
  $("#next").addEventListener("click", function () { state.page++; render(); });
  $("#download").addEventListener("click", download);
  render();
  counter();

  // for scripted use (and the tests): what is on the page, and the CSV the button writes
  window.nnsimExplorer = {
    state: state,
    render: render,
    neighbours: neighbours,
    csv: csv,
    storeKey: storeKey,
    visible: function () {
      return Array.prototype.map.call(root.querySelectorAll("tbody tr"),
                                      function (tr) { return Number(tr.getAttribute("data-sample")); });
    }
  };
})();
