// SVG line plots for benchmark results, rendered headless with vega-lite -> vega (no browser).
import * as vega from 'vega';
import * as vl from 'vega-lite';

export interface LinePlot {
  title: string;
  xTitle: string;
  yTitle: string;
  /** One row per point: x, y and the series it belongs to. */
  points: { x: number; y: number; series: string; panel?: string }[];
}

/** Render a line plot (one line per series; one column per panel when panels are given). */
export async function renderLinePlotSvg(plot: LinePlot): Promise<string> {
  const hasPanels = plot.points.some((p) => p.panel !== undefined);
  const xValues = [...new Set(plot.points.map((p) => p.x))].sort((a, b) => a - b);
  const layer = {
    mark: { type: 'line' as const, point: true },
    encoding: {
      x: { field: 'x', type: 'quantitative' as const, title: plot.xTitle, scale: { type: 'log' as const, base: 2 }, axis: { values: xValues, format: 'd' } },
      y: { field: 'y', type: 'quantitative' as const, title: plot.yTitle },
      color: { field: 'series', type: 'nominal' as const, title: null },
    },
  };
  const spec: vl.TopLevelSpec = hasPanels
    ? {
        title: plot.title,
        data: { values: plot.points },
        facet: { column: { field: 'panel', type: 'nominal', title: null } },
        spec: { width: 320, height: 220, ...layer },
        resolve: { scale: { y: 'independent' } },
      }
    : { title: plot.title, data: { values: plot.points }, width: 420, height: 260, ...layer };
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}
