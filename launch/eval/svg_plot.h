// A small line-plot writer: panels side by side, one polyline with markers per series, written
// as plain SVG text (no dependency; any browser shows it).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace dmsrt {

struct PlotSeries {
  std::string name;
  std::vector<std::pair<double, double>> points;  // (x, y), drawn in x order
};

struct PlotPanel {
  std::string title, x_label, y_label;
  bool log2_x = false;  // x axis in powers of two (compression ratios)
  std::vector<PlotSeries> series;
};

// One SVG document with the panels in a row and a shared legend (series by name).
std::string RenderSvg(const std::string& title, const std::vector<PlotPanel>& panels);

// Escapes &, <, >, " for SVG text.
std::string SvgEscape(const std::string& s);

}  // namespace dmsrt
