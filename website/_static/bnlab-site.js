// The course's website: what its pages add to the theme.

// 1. Saved widgets typeset their labels through MathJax 2's API (MathJax.Hub.Queue) whenever
// window.MathJax exists; the site loads MathJax 3, which has no Hub. This script runs after
// the page's MathJax configuration and before MathJax itself (loaded with defer), so it adds
// a Hub to the configuration that passes each "Typeset" job on to MathJax 3.
(() => {
  const pending = [];
  const typeset = (element) => {
    const mathjax = window.MathJax;
    if (mathjax && mathjax.typesetPromise) {
      mathjax.startup.promise
        .then(() => mathjax.typesetPromise([element]))
        .catch((error) => console.warn("MathJax could not typeset a widget:", error));
    } else {
      pending.push(element);
    }
  };
  const hub = {
    Queue: (...jobs) => {
      for (const job of jobs) {
        if (Array.isArray(job) && job[0] === "Typeset" && job[2]) typeset(job[2]);
        else if (typeof job === "function") job();
      }
    },
  };
  const config = window.MathJax || {};
  if (config.version) return; // MathJax already ran: nothing to configure
  config.Hub = hub; // for a job that comes before MathJax starts
  config.startup = Object.assign({}, config.startup, {
    ready() {
      window.MathJax.startup.defaultReady();
      window.MathJax.Hub = hub;
      pending.splice(0).forEach(typeset);
    },
  });
  window.MathJax = config;
})();

// 2. The deep dive is a closed <details>: open it when the reader arrives at a section
// inside it, from the page's table of contents, a link or a search result.
(() => {
  const openTarget = () => {
    const id = decodeURIComponent(window.location.hash.slice(1));
    const target = id && document.getElementById(id);
    const details = target && target.closest("details.bnlab-deep-dive");
    if (details && !details.open) {
      details.open = true;
      target.scrollIntoView();
    }
  };
  window.addEventListener("hashchange", openTarget);
  document.addEventListener("DOMContentLoaded", openTarget);
})();

// 3. A figure wider than the column is shown shrunk to fit (bnlab-site.css); a click shows it
// at its stored size, and another shrinks it again.
(() => {
  const mark = () => {
    for (const img of document.querySelectorAll("div.cell_output img")) {
      const shrunk = img.naturalWidth > img.clientWidth + 1;
      if (shrunk || img.classList.contains("bnlab-zoomed")) {
        img.classList.add("bnlab-zoomable");
        img.title = "click: stored size / fit the column";
      }
    }
  };
  document.addEventListener("click", (event) => {
    const img = event.target.closest && event.target.closest("img.bnlab-zoomable");
    if (img) img.classList.toggle("bnlab-zoomed");
  });
  window.addEventListener("load", mark);
  window.addEventListener("resize", mark);
})();
