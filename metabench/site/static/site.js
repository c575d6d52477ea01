// Sorts #rank-table by the clicked header: numeric columns by their cells' data-value, text
// columns by it too (falling back to the text); empty values always sort last. The pages
// inline this file and allow only its sha256 in their Content-Security-Policy.
(function () {
  var table = document.getElementById("rank-table");
  if (!table || !table.tHead) { return; }
  var heads = table.tHead.rows[0].cells;
  function value(row, i, numeric) {
    var cell = row.cells[i];
    var v = cell.getAttribute("data-value");
    if (v === null) { v = cell.textContent; }
    if (v === "") { return null; }
    if (numeric) { var x = parseFloat(v); return isNaN(x) ? null : x; }
    return v.toLowerCase();
  }
  function sortBy(i) {
    var th = heads[i];
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var numeric = th.getAttribute("data-type") === "num";
    for (var j = 0; j < heads.length; j++) { heads[j].removeAttribute("aria-sort"); }
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (r, k) { return [value(r, i, numeric), k, r]; });
    keyed.sort(function (a, b) {
      if (a[0] === null || b[0] === null) {
        if (a[0] === b[0]) { return a[1] - b[1]; }
        return a[0] === null ? 1 : -1;
      }
      var c = a[0] < b[0] ? -1 : (a[0] > b[0] ? 1 : 0);
      return (asc ? c : -c) || (a[1] - b[1]);
    });
    keyed.forEach(function (k) { body.appendChild(k[2]); });
  }
  Array.prototype.forEach.call(heads, function (th, i) {
    if (!th.hasAttribute("data-key")) { return; }
    th.tabIndex = 0;
    th.addEventListener("click", function () { sortBy(i); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(i); }
    });
  });
})();
