#include "launch/eval/svg_plot.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace dmsrt {

namespace {
// Distinct enough for one plot of dmsrt's policies beside another implementation's (12 series).
constexpr const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
                                   "#000000", "#aec7e8", "#98df8a", "#ffbb78"};
constexpr double kPanelW = 360, kPanelH = 280, kMarginL = 64, kMarginR = 16, kMarginT = 34,
                 kMarginB = 46, kLegendH = 30;

std::string Num(double v) {
  if (v == 0) return "0";
  const double a = std::fabs(v);
  if (a >= 100) return absl::StrFormat("%.0f", v);
  if (a >= 1) return absl::StrFormat("%.2g", v);
  return absl::StrFormat("%.2g", v);
}
}  // namespace

std::string SvgEscape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

std::string RenderSvg(const std::string& title, const std::vector<PlotPanel>& panels) {
  std::map<std::string, const char*> color;
  std::vector<std::string> names;
  for (const auto& p : panels) {
    for (const auto& s : p.series) {
      if (!color.count(s.name)) {
        color[s.name] = kColors[names.size() % (sizeof(kColors) / sizeof(kColors[0]))];
        names.push_back(s.name);
      }
    }
  }
  const double width = std::max<size_t>(1, panels.size()) * kPanelW;
  const double height = kPanelH + kLegendH + 24;
  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f "
      "%.0f\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" "
      "fill=\"white\"/>\n<text x=\"%.0f\" y=\"16\" text-anchor=\"middle\" font-size=\"13\">%s</text>\n",
      width, height, width, height, width / 2, SvgEscape(title));
  for (size_t pi = 0; pi < panels.size(); ++pi) {
    const PlotPanel& p = panels[pi];
    const double ox = pi * kPanelW, oy = 24;
    const double x0 = ox + kMarginL, x1 = ox + kPanelW - kMarginR;
    const double y0 = oy + kPanelH - kMarginB, y1 = oy + kMarginT;
    double xmin = std::numeric_limits<double>::infinity(), xmax = -xmin, ymin = xmin, ymax = -xmin;
    for (const auto& s : p.series) {
      for (auto [x, y] : s.points) {
        if (!std::isfinite(x) || !std::isfinite(y) || (p.log2_x && x <= 0)) continue;
        const double tx = p.log2_x ? std::log2(x) : x;
        xmin = std::min(xmin, tx), xmax = std::max(xmax, tx);
        ymin = std::min(ymin, y), ymax = std::max(ymax, y);
      }
    }
    if (!std::isfinite(xmin)) xmin = 0, xmax = 1, ymin = 0, ymax = 1;
    if (p.log2_x) xmin = std::floor(xmin + 1e-6), xmax = std::ceil(xmax - 1e-6);
    if (xmax - xmin < 1e-9) xmin -= 0.5, xmax += 0.5;
    const double pad = (ymax - ymin) * 0.08 + 1e-9;
    ymin -= pad, ymax += pad;
    auto X = [&](double x) { return x0 + ((p.log2_x ? std::log2(x) : x) - xmin) / (xmax - xmin) * (x1 - x0); };
    auto Y = [&](double y) { return y0 - (y - ymin) / (ymax - ymin) * (y0 - y1); };
    absl::StrAppend(&svg, absl::StrFormat(
        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"12\">%s</text>\n"
        "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#444\"/>\n",
        (x0 + x1) / 2, y1 - 8, SvgEscape(p.title), x0, y1, x1 - x0, y0 - y1));
    // x ticks
    if (p.log2_x) {
      for (double e = xmin; e <= xmax + 1e-9; e += 1) {
        const double x = x0 + (e - xmin) / (xmax - xmin) * (x1 - x0);
        absl::StrAppend(&svg, absl::StrFormat(
            "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.1f\" "
            "y=\"%.1f\" text-anchor=\"middle\">%s</text>\n",
            x, y0, x, y1, x, y0 + 14, Num(std::pow(2.0, e))));
      }
    } else {
      for (int i = 0; i <= 4; ++i) {
        const double v = xmin + (xmax - xmin) * i / 4;
        const double x = x0 + (x1 - x0) * i / 4;
        absl::StrAppend(&svg, absl::StrFormat(
            "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.1f\" "
            "y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", x, y0, x, y1, x, y0 + 14, Num(v)));
      }
    }
    for (int i = 0; i <= 4; ++i) {
      const double v = ymin + (ymax - ymin) * i / 4;
      const double y = y0 - (y0 - y1) * i / 4;
      absl::StrAppend(&svg, absl::StrFormat(
          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%.1f\" "
          "y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
          x0, y, x1, y, x0 - 4, y + 4, absl::StrFormat("%.3g", v)));
    }
    absl::StrAppend(&svg, absl::StrFormat(
        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n<text transform=\"translate(%.1f "
        "%.1f) rotate(-90)\" text-anchor=\"middle\">%s</text>\n",
        (x0 + x1) / 2, y0 + 32, SvgEscape(p.x_label), ox + 14, (y0 + y1) / 2, SvgEscape(p.y_label)));
    for (const auto& s : p.series) {
      std::vector<std::pair<double, double>> pts;
      for (auto pt : s.points) {
        if (std::isfinite(pt.first) && std::isfinite(pt.second) && (!p.log2_x || pt.first > 0)) {
          pts.push_back(pt);
        }
      }
      std::sort(pts.begin(), pts.end());
      std::string path;
      for (auto [x, y] : pts) absl::StrAppend(&path, absl::StrFormat("%.1f,%.1f ", X(x), Y(y)));
      const char* c = color[s.name];
      absl::StrAppend(&svg, absl::StrFormat(
          "<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"1.8\"/>\n", path, c));
      for (auto [x, y] : pts) {
        absl::StrAppend(&svg, absl::StrFormat(
            "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"><title>%s: %.4g at %.3gx</title></circle>\n",
            X(x), Y(y), c, SvgEscape(s.name), y, x));
      }
    }
  }
  // legend
  double lx = 16;
  const double ly = 24 + kPanelH + 14;
  for (const std::string& n : names) {
    absl::StrAppend(&svg, absl::StrFormat(
        "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"2\"/><text "
        "x=\"%.1f\" y=\"%.1f\">%s</text>\n",
        lx, ly, lx + 20, ly, color[n], lx + 24, ly + 4, SvgEscape(n)));
    lx += 34 + 7.0 * n.size();
  }
  absl::StrAppend(&svg, "</svg>\n");
  return svg;
}

}  // namespace dmsrt
